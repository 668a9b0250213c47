"""Held-out evaluation of a model on a PackedDataset (loss, perplexity, accuracy),
by kind of token on the built-in corpus' problems, and a backward setting's
gradient against the exact masked-loss gradient."""

from centrifuge.evaluation.evaluate import evaluate
from centrifuge.evaluation.gradient_error import agreement, diagnose
from centrifuge.evaluation.token_types import loss_by_token_type

__all__ = ["evaluate", "loss_by_token_type", "agreement", "diagnose"]
