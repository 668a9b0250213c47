"""Run under ``torchrun`` by tests/test_distributed.py: one step of a patched
transformers Llama (float64, CPU) under DDP or FSDP2 with two micro-batches per
process, the loss normalized over every kept row of all of them (the plain-loop
recipe of the README); rank 0 saves the full gradients to argv[2]."""

import sys

import torch
import torch.distributed as dist
import transformers

import centrifuge
from centrifuge.distributed import gradient_sync, init_distributed, parallelize, shutdown_distributed
from centrifuge.integrations.loss import shift_labels

V, B, L, MICRO = 61, 2, 13, 2


def build_model():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    centrifuge.patch(model)  # before any wrapping: the patch checks the model's class
    return model


def micro_batches(rank: int, world: int) -> list[torch.Tensor]:
    """Micro-batch m of process r is global micro-batch m * world + r."""
    g = torch.Generator().manual_seed(1)
    every = [torch.randint(0, V, (B, L), generator=g) for _ in range(MICRO * 2)]
    return every[rank::world]


def train_step(model, batches: list[torch.Tensor], world: int) -> None:
    selector = centrifuge.Selector("loss", 0.5, "sequence")
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, -1] = False  # the last row has no next token
    # The step's kept count follows from the labels: summed over processes once.
    kept = torch.tensor(sum(selector.count(valid) for _ in batches))
    if world > 1:
        dist.all_reduce(kept)
    for i, ids in enumerate(batches):
        with gradient_sync(model, last=i == len(batches) - 1):
            logits = model(input_ids=ids).logits
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), shift_labels(ids), reduction="none")  # fmt: skip
            keep = selector(token_loss.detach(), valid)
            # DDP and FSDP average gradients over processes: scale by world.
            (centrifuge.filtered_loss(token_loss, keep, num_items=kept) * world).backward()


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    ctx = init_distributed("cpu")
    model = parallelize(build_model(), ctx, mode, "fp32")
    train_step(model, micro_batches(ctx.rank, ctx.world_size), ctx.world_size)
    grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
    grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
    if ctx.is_main:
        torch.save(grads, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
