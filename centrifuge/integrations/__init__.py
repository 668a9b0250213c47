"""Centrifuge for Hugging Face transformers users.

* :func:`patch` / :func:`unpatch`: give a transformers Llama/Qwen2/Qwen3/Mistral
  causal LM the compact backward, in place.
* :func:`filtered_loss`: the one-line replacement of a masked mean of per-token
  losses; :func:`selective_loss`: selection + loss from logits and labels.
* ``CentrifugeTrainer`` (``centrifuge.integrations.trainer``): ``transformers.Trainer``
  with token filtering and gradient-accumulation-exact normalization, and
  ``CentrifugeSFTTrainer`` (``centrifuge.integrations.trl``): the same for TRL's
  ``SFTTrainer`` (imported on demand: they need ``accelerate``, and ``trl``).
"""

from centrifuge.integrations.hf import SUPPORTED_MODELS, find_plan, is_patched, patch, patch_options, unpatch
from centrifuge.integrations.loss import filtered_loss, selective_loss, valid_rows


def __getattr__(name):
    if name == "CentrifugeTrainer":
        from centrifuge.integrations.trainer import CentrifugeTrainer

        return CentrifugeTrainer
    if name == "CentrifugeSFTTrainer":
        from centrifuge.integrations.trl import CentrifugeSFTTrainer

        return CentrifugeSFTTrainer
    raise AttributeError(name)


__all__ = [
    "SUPPORTED_MODELS", "patch", "unpatch", "is_patched", "patch_options", "find_plan",
    "filtered_loss", "selective_loss", "valid_rows", "CentrifugeTrainer",
]  # fmt: skip
