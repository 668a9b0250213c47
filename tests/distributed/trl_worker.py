"""Run under ``torchrun`` by tests/test_trl.py (or alone, as one process): the first
step of CentrifugeSFTTrainer on the tiny float64 Llama of test_trl, under DDP or
FSDP2 (argv[1]: ``ddp``/``fsdp``; ``single``: one process with twice the
accumulation); rank 0 saves the step's full gradients to argv[2]."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_trl import CentrifugeSFTTrainer, Grads, config, prompt_completion, tiny_model, tokenizer  # noqa: E402

from centrifuge.distributed import shutdown_distributed  # noqa: E402


def main():
    mode, out = sys.argv[1], sys.argv[2]
    kw = dict(completion_only_loss=True, gradient_accumulation_steps=2 if mode == "single" else 1)
    if mode == "fsdp":
        kw.update(fsdp=True, fsdp_config=dict(fsdp_version=2, reshard_after_forward=False,
                                              transformer_layer_cls_to_wrap=["LlamaDecoderLayer"]))
    grads = Grads()
    trainer = CentrifugeSFTTrainer(
        model=tiny_model(), args=config(Path(out).parent / mode, **kw), train_dataset=prompt_completion(16),
        processing_class=tokenizer(), callbacks=[grads], select="loss", ratio=0.5,
    )  # fmt: skip
    trainer.train()
    full = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.grads.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(full, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
