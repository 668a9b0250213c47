"""Held-out evaluation of a model on a PackedDataset (loss, perplexity, accuracy)."""

from centrifuge.evaluation.evaluate import evaluate

__all__ = ["evaluate"]
