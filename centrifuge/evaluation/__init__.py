"""Held-out evaluation of a model on a PackedDataset (loss, perplexity, accuracy),
and by kind of token on the built-in corpus' problems."""

from centrifuge.evaluation.evaluate import evaluate
from centrifuge.evaluation.token_types import loss_by_token_type

__all__ = ["evaluate", "loss_by_token_type"]
