"""A plain training loop on a Hugging Face model with ``centrifuge.patch`` +
``filtered_loss`` on several processes (DDP or FSDP2), the loss normalized over
every token kept in the step by every process.

    torchrun --nproc-per-node 2 examples/hf_distributed.py --parallel fsdp   # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/hf_distributed.py --parallel ddp --model DIR

The recipe, for any loop:
1. ``centrifuge.patch(model)`` *before* wrapping (the patch checks the model's class);
2. wrap with DDP or FSDP2 (``centrifuge.distributed.parallelize`` applies
   ``fully_shard`` per decoder layer and on the root, or DDP);
3. count the rows selection keeps in the whole step (``Selector.count`` from the
   labels: known before any forward) and all-reduce that count once;
4. per micro-batch, ``filtered_loss(token_loss, keep, num_items=kept) * world``
   (DDP and FSDP average gradients over processes), inside ``gradient_sync``
   so gradients are reduced in the step's last micro-batch only.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

import centrifuge
from centrifuge.distributed import gradient_sync, init_distributed, parallelize, shutdown_distributed
from centrifuge.integrations.loss import shift_labels, valid_rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--model", help="local HF Llama/Qwen2/Qwen3/Mistral directory (default: tiny random Llama)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    args = p.parse_args()

    ctx = init_distributed("auto")  # torchrun's process group; cuda:LOCAL_RANK on GPUs
    torch.manual_seed(0)  # the same initial weights everywhere
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))  # fmt: skip
    vocab = model.config.vocab_size
    centrifuge.patch(model.to(ctx.device))
    model = parallelize(model, ctx, args.parallel, "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    selector = centrifuge.Selector("loss", args.ratio)
    g = torch.Generator().manual_seed(1 + ctx.rank)  # every process its own rows

    for step in range(args.steps):
        batches = [torch.randint(0, vocab, (4, 64), generator=g).to(ctx.device)
                   for _ in range(args.grad_accum)]  # fmt: skip
        kept = torch.tensor(sum(selector.count(valid_rows(b)) for b in batches), device=ctx.device)
        dist.all_reduce(kept)  # rows kept in the whole step, every process
        total = 0.0
        for i, ids in enumerate(batches):
            with gradient_sync(model, last=i == len(batches) - 1):
                logits = model(input_ids=ids).logits
                token_loss = F.cross_entropy(logits.float().transpose(1, 2), shift_labels(ids),
                                             reduction="none")  # fmt: skip
                keep = selector(token_loss, valid_rows(ids))
                loss = centrifuge.filtered_loss(token_loss, keep, num_items=kept)
                (loss * ctx.world_size).backward()
                total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx.is_main and (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {total:.4f} (this process's share of the step's kept rows)")
    shutdown_distributed()


if __name__ == "__main__":
    main()
