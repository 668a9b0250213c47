"""``transformers.Trainer`` with token filtering and the compact backward.

    from centrifuge.integrations.trainer import CentrifugeTrainer

    trainer = CentrifugeTrainer(model=model, args=args, train_dataset=ds,
                                select="rho1", ratio=0.5, reference_model=ref)
    trainer.train()

The model is patched (:func:`centrifuge.patch`). Every training micro-batch:
dense forward with the labels (the final norm, LM head and cross-entropy fused:
per-token losses, no [B, L, vocab] logits), selection (``rho1`` / ``loss`` /
``random`` / ``none``) over the valid rows, loss = sum of the kept rows' losses
/ K, backward on kept rows.

Gradient accumulation: K is the number of rows kept over the *whole*
accumulation window (summed over processes when the Trainer averages tokens
across devices), so the window's gradient is exactly that of the mean over all
its kept rows, whatever the micro-batches' sizes. K is known before the window
runs: selection keeps ``ceil(ratio * n_valid)`` rows per batch (or per sequence),
and ``n_valid`` follows from the labels, the attention mask and the position ids.

``rho1`` reference losses come from ``reference_model`` (run without grad on the
same inputs) or from a ``reference_loss`` column in the batch ([B, L] or
[B, L-1] per-token losses, e.g. precomputed by ``centrifuge score``).

Evaluation reports the ordinary mean loss over all valid rows.

Why a subclass rather than ``compute_loss_func``: that hook sees neither the
inputs (``rho1`` runs the reference model on them) nor the window's micro-batches
(its ``num_items_in_batch`` counts valid tokens, not the tokens kept).
"""

from __future__ import annotations

import os
from collections import deque

import torch
from transformers import Trainer

from centrifuge.integrations.hf import is_patched, patch
from centrifuge.integrations.loss import selective_loss, shift_labels, token_losses, valid_rows
from centrifuge.ops.linear_ce import IGNORE_INDEX
from centrifuge.selection import Selector

REFERENCE_COLUMN = "reference_loss"


def kept_count(selector: Selector, batch: dict, ignore_index: int = IGNORE_INDEX) -> int:
    """How many rows ``selector`` keeps in ``batch`` (labels, attention_mask, position_ids)."""
    return selector.count(valid_rows(
        batch["labels"], batch.get("attention_mask"), batch.get("position_ids"), ignore_index
    ))  # fmt: skip


class CentrifugeTrainer(Trainer):
    """A ``Trainer`` that trains on the selected tokens only, with Centrifuge.

    select, ratio, granularity, seed: the :class:`Selector` (or pass ``selector``).
        ``random`` draws from torch's default generator by default (seeded by
        ``args.seed``), from a generator of the selector's own with ``seed=``;
        checkpoints save either, and resuming continues the sequence.
    reference_model: the ``rho1`` reference (same tokenizer), or None when the
        batches carry a ``reference_loss`` column.
    ignore_index: the labels' no-loss value.
    Every other argument goes to ``transformers.Trainer``.
    """

    # The loss is normalized over the accumulation window (K above): the
    # Trainer must not divide it by the number of accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        select: str = "loss",
        ratio: float = 0.5,
        granularity: str = "batch",
        seed: int | None = None,
        selector: Selector | None = None,
        reference_model=None,
        ignore_index: int = IGNORE_INDEX,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.selector = selector or Selector(select, ratio, granularity, seed)
        if self.selector.needs_reference and reference_model is not None:
            reference_model.eval().requires_grad_(False)
        self.reference_model = reference_model
        self.ignore_index = ignore_index
        self._kept_counts: deque[int] = deque()  # the window's micro-batches, in order
        if not is_patched(self.model):
            patch(self.model)
        # transformers < 5.20 decides the same from this flag (with num_items_in_batch given).
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REFERENCE_COLUMN not in self._signature_columns:
            self._signature_columns.append(REFERENCE_COLUMN)

    def _save_rng_state(self, output_dir: str) -> None:
        """Torch's RNG state, and the selector's own generator beside it."""
        super()._save_rng_state(output_dir)
        state = self.selector.state_dict()
        if state:
            torch.save(state, os.path.join(output_dir, self._selector_state_file))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, self._selector_state_file) if checkpoint else None
        if path and os.path.isfile(path):
            self.selector.load_state_dict(torch.load(path, weights_only=True))

    @property
    def _selector_state_file(self) -> str:
        return f"selector_state_{self.args.process_index}.pth"

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The window's micro-batches and K, the rows kept over the whole window."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        counts = [kept_count(self.selector, b, self.ignore_index) for b in batch_samples]
        # Each micro-batch's own count, in the order the Trainer runs them: its
        # selection and plan then need no host sync (compute_loss takes them).
        self._kept_counts = deque(counts)
        kept = torch.tensor(sum(counts), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            kept = self.accelerator.gather(kept).sum()
        return batch_samples, kept

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError("CentrifugeTrainer needs a 'labels' column (unshifted, -100 where no loss)")
        labels = inputs.pop("labels")
        ref_loss = inputs.pop(REFERENCE_COLUMN, None)
        mask, pos = inputs.get("attention_mask"), inputs.get("position_ids")
        training = model.training and torch.is_grad_enabled()
        if training:
            # The patched model takes the labels (HF's ignore value) and returns
            # per-token losses from the fused norm + LM head + cross-entropy:
            # no [B, L, vocab] logits.
            hf_labels = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
            outputs = model(**inputs, labels=hf_labels, use_cache=False)
        else:
            outputs = model(**inputs, use_cache=False)
        logits = outputs.logits
        if not training:
            # Evaluation: the plain mean loss over every valid row.
            valid = valid_rows(labels, mask, pos, self.ignore_index)
            tl = token_losses(logits, shift_labels(labels, self.ignore_index), self.ignore_index)
            loss = (tl * valid).sum() / valid.sum().clamp(min=1)
            return (loss, outputs) if return_outputs else loss
        ref_logits = None
        if self.selector.needs_reference and ref_loss is None:
            if self.reference_model is None:
                raise ValueError(
                    "selection 'rho1' needs reference_model=... or a 'reference_loss' column"
                )
            with torch.no_grad():
                ref_logits = self.reference_model(**inputs, use_cache=False).logits
        # A fused output carries its per-token losses; otherwise (the model asked
        # for hidden states in its config) transformers' logits path ran.
        fused = getattr(outputs, "token_loss", None) is not None
        loss = selective_loss(
            outputs if fused else logits, hf_labels, attention_mask=mask, position_ids=pos,
            selector=self.selector, reference_logits=ref_logits, reference_loss=ref_loss,
            num_items=num_items_in_batch,
            count=self._kept_counts.popleft() if self._kept_counts else None,
        )  # fmt: skip
        if num_items_in_batch is None:
            # No window count (a custom loop): a per-micro-batch mean, scaled here.
            loss = loss / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        elif self.args.average_tokens_across_devices and self.args.world_size > 1:
            # K counts every process's kept rows; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
