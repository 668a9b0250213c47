"""Held-out evaluation: mean token loss, perplexity and (for the built-in
corpus) answer accuracy."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 8, device="cpu", max_rows: int | None = None,
             problems=None) -> dict:  # fmt: skip
    """Loss over every labelled row of the first ``max_rows`` rows of ``dataset``.

    model:    a native LlamaForCausalLM (evaluated in its own dtype, in eval mode).
    dataset:  a PackedDataset (``ds.batch(indices)`` -> [n, seq_len] tensors).
    problems: held-out problems for :func:`centrifuge.data.corpus.answer_accuracy`;
              None = the dataset's own (``dataset.problems``, set for the built-in
              corpus' eval split); no problems (or an empty list): accuracy is None.
    Returns dict(loss=float, perplexity=float, accuracy=float | None, tokens=int).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset) if max_rows is None else min(len(dataset), int(max_rows))
    if n < 1:
        raise ValueError("evaluation needs at least one row")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            b = dataset.batch(range(start, min(n, start + batch_size)))
            out = model(b["input_ids"].to(device), labels=b["labels"].to(device),
                        position_ids=b["position_ids"].to(device))  # fmt: skip
            # Sum in float64: thousands of rows' losses, one mean at the end.
            total += float(out.token_loss.double()[out.valid].sum())
            count += int(out.valid.sum())
        if count == 0:
            raise ValueError("the evaluation rows hold no labelled token")
        loss = total / count
        if problems is None:
            problems = getattr(dataset, "problems", None)
        accuracy = None
        if problems:
            from centrifuge.data.corpus import answer_accuracy

            accuracy = answer_accuracy(model, dataset.tokenizer, problems, device)
    finally:
        model.train(was_training)
    return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), accuracy=accuracy, tokens=count)
