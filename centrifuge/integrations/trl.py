"""TRL's ``SFTTrainer`` with token filtering and the compact backward.

    from centrifuge import CentrifugeSFTTrainer

    trainer = CentrifugeSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                                   processing_class=tokenizer, select="loss", ratio=0.5)

Everything ``SFTTrainer`` prepares stays TRL's: the dataset (tokenization, chat
templates, ``completion_only_loss`` and ``assistant_only_loss`` as ``-100``
labels, packing with position ids restarting at every document, padding-free
batches), ``peft_config``, gradient checkpointing, DDP and FSDP2. The training
loss is :class:`~centrifuge.integrations.trainer.CentrifugeTrainerMixin`'s: the
mean over the rows kept in the accumulation window, with ``loss_type="dft"``
weighting every kept row by its probability as TRL does.

Why TRL's own loss cannot be used: its fused LM head (``add_fused_lm_head``)
replaces ``model.forward`` and calls the backbone itself, which would bypass
``centrifuge.patch`` (a patched model refuses that). Here the model is patched
on top of it: training forwards run Centrifuge's fused norm + LM head +
cross-entropy, calls without gradients (evaluation, ``generate``) run TRL's
forward, so evaluation is TRL's, metrics included.

TRL's training metrics are kept: ``num_tokens`` as TRL counts it, and
``entropy`` and ``mean_token_accuracy`` over the labelled rows (as TRL: the
mean of the micro-batches' means), computed without gradient from the final
hidden states. All are gathered once per log instead of once per micro-batch
(no host sync between a forward and its backward). The two token metrics cost
one more LM-head product over the labelled rows (about the LM head's forward);
``token_metrics=False`` skips it. Centrifuge adds ``kept_fraction`` and
``kept_tokens``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from centrifuge.integrations.hf import _causal_lm, shift_labels
from centrifuge.integrations.loss import _CHUNK_ELEMENTS
from centrifuge.integrations.trainer import CentrifugeTrainerMixin


@torch.no_grad()
def entropy_and_top1(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor):
    """Sums over rows of the next-token entropy and of top-1 hits.

    h: [n, d] final hidden states (after the norm), w: [V, d] LM head weight,
    targets: [n] int64. Logits in h.dtype, softmax in float32 (as the loss).
    Returns (entropy sum, hits), float32 / int64 scalars.
    """
    entropy = torch.zeros((), device=h.device)
    hits = torch.zeros((), device=h.device, dtype=torch.long)
    step = max(1, _CHUNK_ELEMENTS // w.shape[0])
    for s in range(0, h.shape[0], step):
        logits = F.linear(h[s : s + step], w).float()
        logp = torch.log_softmax(logits, dim=-1)
        entropy += -(logp.exp() * logp).sum()
        hits += (logits.argmax(-1) == targets[s : s + step]).sum()
    return entropy, hits


class _TokenMetrics:
    """A forward hook on the final norm: computes the micro-batch's entropy and
    top-1 hits over its valid rows while the forward runs (under FSDP2 the
    weights are gathered then). rows: [B, L] bool, targets: [B, L] int64."""

    def __init__(self, model, rows: torch.Tensor, targets: torch.Tensor):
        lm = _causal_lm(model)
        self.norm, self.head = lm.model.norm, lm.lm_head
        self.rows, self.targets = rows, targets
        self.result = None

    def __enter__(self):
        self.handle = self.norm.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def __call__(self, norm, args, output):
        with torch.no_grad():
            x = args[0].detach()[self.rows]  # the norm's input: the patched one may pass it through
            h = type(norm).forward(norm, x)  # transformers' own norm, without hooks or patch
            entropy, hits = entropy_and_top1(h, self.head.weight, self.targets[self.rows])
        self.result = torch.stack([entropy, hits.to(entropy.dtype), self.rows.sum().to(entropy.dtype)])


class CentrifugeSFTTrainer(CentrifugeTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that trains on the selected tokens only, with Centrifuge.

    The selection and backward arguments are
    :class:`~centrifuge.integrations.trainer.CentrifugeTrainerMixin`'s
    (``select``, ``ratio``, ``granularity``, ``seed``, ``selector``,
    ``reference_model``, ``backward``); token_metrics: log TRL's ``entropy`` and
    ``mean_token_accuracy`` (one no-grad LM-head pass per micro-batch). Every
    other argument goes to ``SFTTrainer``.
    """

    def __init__(self, *args, token_metrics: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_metrics = token_metrics
        self._token_stats: list[torch.Tensor] = []  # [entropy, hits, rows] per micro-batch
        self._tokens_seen: list[torch.Tensor] = []  # num_tokens per micro-batch

    def kept_loss(self, token_loss, keep, num_kept, inputs):
        if self.args.loss_type == "dft":  # DFT: each row's loss weighted by its probability
            token_loss = token_loss * torch.exp(-token_loss.detach())
        return super().kept_loss(token_loss, keep, num_kept, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):  # TRL's evaluation
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "attention_mask" in inputs:  # TRL's num_tokens: padded rows, or the padding-free row
            self._tokens_seen.append(inputs["attention_mask"].sum())
        else:
            ids = inputs["input_ids"]
            self._tokens_seen.append(torch.tensor(ids.shape[1], device=ids.device))
        metrics = contextlib.nullcontext()
        if self.token_metrics:
            targets = shift_labels(inputs["labels"], self.ignore_index)
            metrics = _TokenMetrics(self.model, targets != self.ignore_index, targets)  # TRL's label mask
        with metrics:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.token_metrics:
            self._token_stats.append(metrics.result)
        return out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # TRL's metrics of the micro-batches since the last log, gathered once here
        # (TRL gathers and syncs every micro-batch).
        if self.model.training and self._tokens_seen:
            seen = self.accelerator.gather(torch.stack(self._tokens_seen).sum()[None]).sum()
            self._total_train_tokens += int(seen)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            self._tokens_seen = []
        if self.model.training and self._token_stats:
            stats = torch.stack(self._token_stats)  # [micro-batches, 3]
            stats = self.accelerator.gather(stats[None]).sum(0).tolist()
            for entropy, hits, n in stats:
                self._metrics["train"]["entropy"].append(entropy / n if n else 0.0)
                self._metrics["train"]["mean_token_accuracy"].append(hits / n if n else 0.0)
            self._token_stats = []
        super().log(logs, start_time)
