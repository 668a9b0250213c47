"""The output of a patched model's training forward given ``labels=``.

A module of its own because it subclasses a transformers class and transformers
is optional: :mod:`centrifuge.integrations.hf` imports it when a fused forward
runs (transformers is then loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class CausalLMTokenLossOutput(CausalLMOutputWithPast):
    """The output of a patched training forward given ``labels=`` (fused path).

    loss: scalar, the mean of ``token_loss`` over the valid rows (or its sum /
        ``num_items_in_batch`` when transformers passes that), as HF's own loss.
    logits: None: the final norm, the LM head and the cross-entropy run fused,
        and no [B, L, vocab] logits exist.
    token_loss: [B, L] float32 (float64 for a float64 model), row t's loss for
        predicting token t+1; 0 where ``valid`` is False. Give it to
        ``filtered_loss`` with a keep mask.
    valid: [B, L] bool, the rows with a target (:func:`valid_rows`).
    """

    token_loss: torch.Tensor | None = None
    valid: torch.Tensor | None = None
