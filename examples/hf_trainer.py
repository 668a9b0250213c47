"""Token-filtered training with the Hugging Face Trainer and Centrifuge.

    python examples/hf_trainer.py                      # tiny random Qwen2, a toy task, CPU
    python examples/hf_trainer.py --select rho1        # Rho-1 with a reference model
    python examples/hf_trainer.py --model DIR          # a local HF Llama/Qwen2/Qwen3/Mistral dir
    torchrun --nproc-per-node 2 examples/hf_trainer.py [--fsdp]   # DDP, or FSDP2 (CPU or GPUs)

``CentrifugeTrainer`` is ``transformers.Trainer`` with three extra arguments
(``select``, ``ratio``, ``reference_model``): it patches the model, selects the
tokens of every micro-batch, and normalizes the loss by the number of tokens
kept over the whole gradient-accumulation window, so accumulation gives the
mean over all kept tokens of the window.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import transformers

from centrifuge.distributed import shutdown_distributed
from centrifuge.integrations.trainer import CentrifugeTrainer


class ToyTask(torch.utils.data.Dataset):
    """Rows count up mod ``vocab`` by a per-row step; ``noise`` of the tokens are
    random (the tokens a good selection learns to skip)."""

    def __init__(self, n, seq_len, vocab, noise=0.2, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq_len)) % vocab
        flip = torch.rand(self.ids.shape, generator=g) < noise
        self.ids[flip] = torch.randint(0, vocab, (int(flip.sum()),), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def load_model(path, vocab):
    if path:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local Hugging Face model directory (default: tiny random Qwen2)")
    p.add_argument("--select", default="loss", choices=["rho1", "loss", "random", "none"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--out", default=None, help="output dir (default: a temporary one)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: FSDP2 (one unit per decoder layer) instead of DDP")
    args = p.parse_args()

    vocab, seq_len = 32, 32
    model = load_model(args.model, vocab)
    vocab = model.config.vocab_size
    train_ds = ToyTask(256, seq_len, vocab, seed=0)
    eval_ds = ToyTask(32, seq_len, vocab, noise=0.0, seed=1)
    reference = None
    if args.select == "rho1":
        # Rho-1's reference is trained on clean, high-quality data; here a copy
        # briefly trained on the noise-free task stands in for it.
        reference = copy.deepcopy(model)
        opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
        clean = ToyTask(256, seq_len, vocab, noise=0.0, seed=2)
        for i in range(0, 256, 16):
            b = transformers.default_data_collator([clean[j] for j in range(i, i + 16)])
            reference(**b).loss.backward()
            opt.step()
            opt.zero_grad()

    out = args.out or tempfile.mkdtemp(prefix="centrifuge-hf-trainer-")
    training_args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=5,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        # FSDP2 through the Trainer (accelerate): each decoder layer one unit, its
        # weights kept from forward to backward (see README, Several GPUs).
        **(dict(fsdp=True, fsdp_config=dict(
            fsdp_version=2, reshard_after_forward=False,
            transformer_layer_cls_to_wrap=[type(model.model.layers[0]).__name__])) if args.fsdp else {}),
    )  # fmt: skip
    trainer = CentrifugeTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        select=args.select, ratio=args.ratio, reference_model=reference,
    )  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(out)  # an ordinary HF checkpoint: from_pretrained(out) loads it
    if trainer.is_world_process_zero():
        print(f"eval loss on clean rows: {before:.3f} -> {after:.3f}")
        print(f"saved to {out}")
    shutdown_distributed()  # under torchrun: leave the process group together


if __name__ == "__main__":
    main()
