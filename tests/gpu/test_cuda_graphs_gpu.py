"""GPU tests of captured steps (skipped without CUDA): the bench's native steps
never wait for the host, and a step replayed from CUDA graphs gives the eager
step's loss and gradients, on the batch it was captured with and on new
batches copied into its inputs (other tokens, so other kept rows).

    python -m pytest tests/gpu/test_cuda_graphs_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from test_model_gpu import CONFIGS, worst_rel

from centrifuge.bench.variants import native_variants
from centrifuge.cuda_graphs import GraphedStep
from centrifuge.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def grads(model) -> dict:
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def tokens(seed, B=3, L=257):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIGS["llama-gqa-d64"].vocab_size, (B, L), generator=g).cuda()


@pytest.mark.parametrize("prompt_share", [0.0, 0.3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_steps_never_wait_for_the_host(name, prompt_share):
    """A host sync inside a step would make its capture fail: CUDA's sync debug
    mode turns each one into an error (dense, masked, Centrifuge, checkpointed,
    the compact path (small models take the dense one), an exact-layers knob and
    kv_projections on the compact path; pretraining and SFT labels)."""
    model = build_model(CONFIGS[name], dtype=torch.float32, device="cuda", seed=0)
    ids = tokens(0)
    knobs = ("exact_layers=1", "path=compact", "kv_projections=1,path=compact")
    for v in native_variants(model, True, knobs, prompt_share):
        v.loss(ids, 0.5).backward()  # caches and Triton compiles on the first call
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            v.loss(ids, 0.5).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_replayed_step_equals_the_eager_step(name, dtype):
    """Every capturable bench step (with and without checkpointing, SFT labels),
    captured on one batch, replayed on it and on two others."""
    model = build_model(CONFIGS[name], dtype=dtype, device="cuda", seed=0)
    params = list(model.parameters())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for share in (0.0, 0.3):
        for v in native_variants(model, True, ("exact_layers=1", "path=compact"), share):
            ids = tokens(1)
            step = GraphedStep(lambda: (v.loss(ids, 0.5),), params)
            model.zero_grad(set_to_none=True)
            for seed in (1, 2, 3):
                ids.copy_(tokens(seed))
                loss = step.forward()[0].item()
                step.backward()
                got = grads(model)
                model.zero_grad(set_to_none=True)
                want_loss = v.loss(ids, 0.5)
                want_loss.backward()
                want = grads(model)
                model.zero_grad(set_to_none=True)
                assert loss == pytest.approx(want_loss.item(), rel=tol), (v.name, seed)
                assert got.keys() == want.keys()
                err = worst_rel(got, want)
                assert err < tol, f"{v.name} share {share} seed {seed}: {err:.2e}"


def packed_positions(seed, B=2, L=160, docs=3) -> torch.Tensor:
    """[B, L] CPU position ids of ``docs`` documents per row at random bounds (the
    same number of documents, so the same number of rows with a target)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randperm(L - 2, generator=g)[: docs - 1].add(1).tolist())
        for start, end in zip([0, *cuts], [*cuts, L]):
            pos[b, start:end] = torch.arange(end - start)
    return pos


@pytest.mark.parametrize("path", ["dense", "compact"])
def test_replays_follow_the_new_document_bounds(path):
    """Packed rows whose document bounds change from batch to batch, copied into
    fixed buffers as ``centrifuge train --cuda-graphs`` does: every replay attends
    within its own batch's documents. (The backward's per-row bounds are cached
    per step; a capture that read the warm-up's entry replayed stale bounds.)"""
    from centrifuge.cuda_graphs import StaticInputs
    from centrifuge.plan import BackwardOptions, Layout
    from centrifuge.selection import Selector

    model = build_model(CONFIGS["llama-gqa-d64"], dtype=torch.float32, device="cuda", seed=0)
    params = list(model.parameters())
    options, selector = BackwardOptions.parse(f"path={path}"), Selector("loss", 0.5)
    inputs = StaticInputs(torch.device("cuda"))

    def batch(seed):
        pos = packed_positions(seed)
        layout = Layout.build(*pos.shape, "cpu", pos).padded(8)
        ids = tokens(seed, *pos.shape)
        valid = torch.ones_like(pos, dtype=torch.bool)
        valid[:, :-1] &= pos[:, 1:] != 0  # a document's last row has no target
        valid[:, -1] = False
        b = inputs.update(ids=ids, pos=layout.position_ids, seg=layout.segment_ids, cu=layout.cu_seqlens)
        return b, selector.count(valid), layout.max_seqlen

    def loss(b, count, max_seqlen):
        out = model(b["ids"], labels=b["ids"], backward=options,
                    layout=Layout(b["pos"], b["seg"], b["cu"], max_seqlen))  # fmt: skip
        keep, _ = selector.select(out.token_loss, out.valid, count=count)
        out.plan.set_context(None)  # pretraining labels: no context rows (no sync to find them)
        out.plan.set_keep(keep, count)
        return ((out.token_loss * keep).sum(),)

    b, count, max_seqlen = batch(1)
    step = GraphedStep(lambda: loss(b, count, max_seqlen), params)
    for seed in (2, 3, 1):
        assert batch(seed)[1:] == (count, max_seqlen)
        got_loss = step.forward()[0].item()
        step.backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        want_loss = loss(b, count, max_seqlen)[0]
        want_loss.backward()
        want = grads(model)
        model.zero_grad(set_to_none=True)
        assert got_loss == pytest.approx(want_loss.item(), rel=1e-5)
        assert worst_rel(got, want) < 1e-5, f"seed {seed}: {worst_rel(got, want):.2e}"


def test_accumulating_replays_sum_micro_batches():
    """accumulate=True: replays add to the gradients, as eager micro-batches do,
    and a capture in the middle of a step keeps what the step summed so far."""
    model = build_model(CONFIGS["llama-gqa-d64"], dtype=torch.float32, device="cuda", seed=0)
    params = list(model.parameters())
    v = {v.name: v for v in native_variants(model)}["centrifuge"]
    ids = tokens(1)
    v.loss(ids, 0.5).backward()  # a first micro-batch, eager
    first = grads(model)
    step = GraphedStep(lambda: (v.loss(ids, 0.5),), params, accumulate=True)
    assert worst_rel(grads(model), first) == 0
    ids.copy_(tokens(2))
    step.forward()
    step.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    ids.copy_(tokens(1))
    v.loss(ids, 0.5).backward()
    ids.copy_(tokens(2))
    v.loss(ids, 0.5).backward()
    assert worst_rel(got, grads(model)) < 1e-5


def _trained(ckpt) -> tuple[dict, dict, dict]:
    """A checkpoint's weights, AdamW moments (``exp_avg``, ``exp_avg_sq`` of each
    parameter, as ``"<key> <name>"``), both in float64, and AdamW step counts."""
    from safetensors.torch import load_file

    weights = {k: v.double() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    moments = {f"{key} {name}": st[key].double()
               for name, st in state.items() for key in ("exp_avg", "exp_avg_sq")}  # fmt: skip
    return weights, moments, {name: st["step"].item() for name, st in state.items()}


@pytest.mark.parametrize("kw", [
    dict(select="loss"),
    dict(select="loss", grad_accum=2, activation_checkpointing=True, backward_path="compact"),
    dict(select="loss", exact_every=2, backward_ratio=0.7),
    dict(select="rho1", reference="self"),
    dict(select="loss", backward="exact"),
    dict(select="loss", sft=True),
    dict(select="loss", kv_projections=True, backward_path="compact"),
])  # fmt: skip
def test_captured_training_equals_eager(tmp_path, data_file, sft_file, cache, kw):
    """centrifuge train --cuda-graphs trains what the eager loop trains (packed
    documents, so the layouts and kept counts vary from batch to batch; SFT data,
    so the context counts vary too): the same losses, weights and AdamW state,
    with the update replayed from the second step on; a resumed captured run
    included, and checkpoints crossing over (an eager run's continued captured,
    a captured run's continued eagerly)."""
    from centrifuge.training import TrainConfig, train
    from centrifuge.training.metrics import read_metrics

    kw = dict(kw)
    data = sft_file if kw.pop("sft", False) else data_file
    if kw.get("reference") == "self":  # a reference model: a short plain run on the same data
        ref = TrainConfig(model="tiny", data=[str(data)], select="none", seq_len=64, batch_size=4,
                          steps=2, eval_interval=0, save_interval=0, cache_dir=cache, device="cuda",
                          out_dir=str(tmp_path / "ref"))  # fmt: skip
        kw["reference"] = train(ref, progress=False)["checkpoint"]
    common = dict(model="tiny", data=[str(data)], ratio=0.5, seq_len=64, batch_size=4, steps=6,
                  warmup_steps=2, lr=1e-2, eval_interval=0, eval_rows=4, save_interval=3, cache_dir=cache,
                  device="cuda", **kw)  # fmt: skip
    runs = dict(eager=train(TrainConfig(out_dir=str(tmp_path / "eager"), **common), progress=False),
                graphs=train(TrainConfig(out_dir=str(tmp_path / "graphs"), cuda_graphs=True, **common),
                             progress=False))  # fmt: skip
    resumed_dir = tmp_path / "resumed"
    train(TrainConfig(out_dir=str(resumed_dir), cuda_graphs=True, **dict(common, steps=3)), progress=False)
    runs["resumed"] = train(TrainConfig(out_dir=str(resumed_dir), cuda_graphs=True, resume=True, **common),
                            progress=False)  # fmt: skip
    for name, source, graphs in (("eager-to-graphs", "eager", True), ("graphs-to-eager", "graphs", False)):
        runs[name] = train(TrainConfig(out_dir=str(tmp_path / name), cuda_graphs=graphs,
                                       resume=str(tmp_path / source / "checkpoint-3"), **common),
                           progress=False)  # fmt: skip
    # The first update of a process runs eagerly (AdamW creates its state), the rest replay.
    replayed = {name: s["cuda_graphs"]["update_replayed"] for name, s in runs.items() if s["cuda_graphs"]}
    assert replayed == {"graphs": 5, "resumed": 2, "eager-to-graphs": 2}
    losses = {name: {r["step"]: r["loss"] for r in read_metrics(s["metrics"]) if r["kind"] == "train"}
              for name, s in runs.items()}  # fmt: skip
    want_weights, want_moments, want_steps = _trained(tmp_path / "eager" / "checkpoint-6")
    for name in runs:  # a run continued in another directory logs steps 4-6
        assert list(losses[name].values()) == pytest.approx([losses["eager"][s] for s in losses[name]],
                                                            rel=1e-4), name  # fmt: skip
        weights, moments, steps = _trained(tmp_path / name / "checkpoint-6")
        assert steps == want_steps, name
        # The moments are sums of gradients: the runs' rounding differences are not
        # diluted by the initial weights there (measured on the CPU in fp32, the dense
        # path against the compact one after these 6 steps: about 3x the weights').
        for what, got, want, tol in (("weights", weights, want_weights, 1e-4),
                                     ("moments", moments, want_moments, 1e-3)):  # fmt: skip
            assert got.keys() == want.keys()
            err = worst_rel(got, want)
            assert err < tol, f"{name}, {what}: {err:.2e}"
