"""Run under ``torchrun`` by tests/test_tensor_parallel.py: one step of the native
model (float64, CPU) under tensor parallelism over ``tp`` processes (and FSDP2
over the processes / tp replicas), for every case in argv[2] (JSON; its "tp"
key, 2 when absent); rank 0 saves each case's full gradients to argv[1] (a
torch file: ``grads``, a list of dicts, and ``backward_gathers``, the all-gathers
each case's backward calls made on rank 0). The test runs :func:`step` in one process for
the reference."""

import json
import sys

import torch

from centrifuge.models import build_model, get_preset
from centrifuge.models.llama import shift_targets
from centrifuge.plan import BackwardOptions, Layout
from centrifuge.selection import Selector

B, L, MICRO = 2, 16, 2


def batches(case: dict) -> list[dict]:
    """MICRO micro-batches: ``packed`` rows (documents restart mid-row), ``padded``
    rows (a right-padded attention mask), or plain rows; with prompts (labels
    -100 on each row's first tokens: context rows)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, 512, (B, L), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        b = dict(input_ids=ids, labels=labels)
        if case.get("batch") == "packed":
            b["position_ids"] = torch.cat([torch.arange(6), torch.arange(L - 6)]).expand(B, L)
        elif case.get("batch") == "padded":
            mask = torch.ones(B, L, dtype=torch.long)
            mask[1, L - 5 :] = 0
            b["attention_mask"] = mask
        out.append(b)
    return out


def _valid(b: dict) -> torch.Tensor:
    layout = Layout.build(B, L, "cpu", b.get("position_ids"), b.get("attention_mask"))
    valid = shift_targets(b["labels"], layout) != -100
    if "attention_mask" in b:
        valid &= b["attention_mask"].bool()
    return valid


def model_for(case: dict):
    model = build_model(get_preset(case.get("model", "tiny")), dtype=torch.float64, seed=0)
    if case.get("recompute"):
        model.activation_checkpointing_enable()
    return model


def step(model, case: dict, replica: int = 0, replicas: int = 1) -> None:
    """Forward and backward of this replica's micro-batches, the loss normalized
    over every kept row of the step (and scaled by the replicas, which FSDP averages)."""
    selector = Selector("loss", 0.5, "batch")
    every = batches(case)
    total = sum(selector.count(_valid(b)) for b in every)
    knobs = {k: case[k] for k in ("extra", "exact_layers", "context") if k in case}
    backward = BackwardOptions(case.get("backward", "amplified"), seed=1, **knobs)
    for b in every[replica::replicas]:
        out = model(**b, backward=backward)
        keep = selector(out.token_loss.detach(), out.valid)
        with _counting_gathers():
            (out.plan.loss(out.token_loss, keep) * out.plan.n_keep / total * replicas).backward()


BACKWARD_GATHERS = [0]  # all-gathers inside backward() calls (the recompute's included)


class _counting_gathers:
    """Counts torch.distributed.all_gather_into_tensor calls while inside (none on one process)."""

    def __enter__(self):
        import torch.distributed as dist

        self.dist, self.original = dist, dist.all_gather_into_tensor

        def counted(*a, **k):
            BACKWARD_GATHERS[0] += 1
            return self.original(*a, **k)

        dist.all_gather_into_tensor = counted

    def __exit__(self, *exc):
        self.dist.all_gather_into_tensor = self.original


def main() -> None:
    from centrifuge.distributed import init_distributed, parallelize, reduce_replicated_grads
    from centrifuge.distributed import shutdown_distributed

    out, cases = sys.argv[1], json.loads(sys.argv[2])
    grads, gathers = [], []
    for case in cases:
        ctx = init_distributed("cpu", case.get("tp", 2))
        model = parallelize(model_for(case), ctx, "fsdp" if ctx.dp_size > 1 else "none", "fp32")
        BACKWARD_GATHERS[0] = 0
        step(model, case, ctx.dp_rank, ctx.dp_size)
        gathers.append(BACKWARD_GATHERS[0])
        reduce_replicated_grads(model)
        g = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        grads.append(g)
    if ctx.is_main:
        torch.save(dict(grads=grads, backward_gathers=gathers), out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
