"""``transformers.Trainer`` with token filtering and the compact backward.

    from centrifuge import CentrifugeTrainer

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
:meth:`CentrifugeTrainerMixin.kept_loss` is the hook for another loss over the
kept rows; it gets K.

``rho1`` reference losses come from ``reference_model`` (run without grad on the
same inputs) or from a ``reference_loss`` column in the batch ([B, L] or
[B, L-1] per-token losses, e.g. precomputed by ``centrifuge score``).

Logged with the loss: ``kept_fraction`` (rows kept / valid rows since the last
log) and ``kept_tokens`` (rows kept since training began), over all processes.
Evaluation reports the ordinary mean loss over all valid rows.

Why a subclass rather than ``compute_loss_func``: that hook sees neither the
inputs (``rho1`` runs the reference model on them) nor the window's micro-batches
(its ``num_items_in_batch`` counts valid tokens, not the tokens kept).
:class:`CentrifugeTrainerMixin` holds all of this, so that TRL's ``SFTTrainer``
gets the same (:mod:`centrifuge.integrations.trl`).
"""

from __future__ import annotations

import os
from collections import deque

import torch
from transformers import Trainer

from centrifuge.integrations.hf import patch, patch_options, unpatch
from centrifuge.integrations.loss import selective_loss, shift_labels, token_losses, valid_rows
from centrifuge.ops.linear_ce import IGNORE_INDEX
from centrifuge.plan import BackwardOptions
from centrifuge.selection import Selector

REFERENCE_COLUMN = "reference_loss"


def row_counts(selector: Selector, batch: dict, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(rows ``selector`` keeps, valid rows) in ``batch`` (labels, attention_mask, position_ids)."""
    valid = valid_rows(
        batch["labels"], batch.get("attention_mask"), batch.get("position_ids"), ignore_index
    )  # fmt: skip
    return selector.count(valid), int(valid.sum())


def _same_options(a: BackwardOptions, b: BackwardOptions) -> bool:
    fields = ("mode", "extra", "weight", "exact_layers", "exact_top", "kv_projections", "seed", "path",
              "context", "backward_ratio")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _patch_kwargs(model, backward: BackwardOptions | None) -> dict:
    """The options to patch ``model`` with: ``backward`` or what the user gave
    ``centrifuge.patch`` (a conflict between the two is an error, never a silent reset)."""
    given = patch_options(model) if isinstance(model, torch.nn.Module) else None
    if given is None:
        return {"backward": backward}
    mine = given["backward"]
    if backward is not None and mine is not None and not _same_options(backward, mine):
        raise ValueError(
            "the model was patched with centrifuge.patch(model, backward=...) and the trainer was given "
            "other backward= options: pass them in one place"
        )
    return {"check_rows": given["check_rows"], "backward": given["backward"] or backward}


class CentrifugeTrainerMixin:
    """Token filtering for a ``transformers.Trainer`` subclass (put it first in the bases).

    select, ratio, granularity, seed: the :class:`Selector` (or pass ``selector``).
        ``random`` draws from torch's default generator by default (seeded by
        ``args.seed``), from a generator of the selector's own with ``seed=``;
        checkpoints save either, and resuming continues the sequence.
    reference_model: the ``rho1`` reference (same tokenizer), or None when the
        batches carry a ``reference_loss`` column.
    ignore_index: the labels' no-loss value.
    backward: :class:`~centrifuge.plan.BackwardOptions` for the patch (quality
        knobs); a model already patched with options keeps them (other options
        given here are an error).
    Every other argument goes to the Trainer. The model is patched after the
    Trainer's own set-up, outermost, so nothing the Trainer wraps around its
    forward (Liger kernels, TRL's fused LM head) can bypass the patch.
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
        backward: BackwardOptions | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        options = _patch_kwargs(model, backward)
        if isinstance(model, torch.nn.Module):
            unpatch(model)  # patched again below, outermost
        super().__init__(*args, **kwargs)
        self._check_loss_options()
        if self.args.use_liger_kernel:
            # transformers applies Liger's kernels in train(), over the patch,
            # which they would bypass: applied now, under it (patch says so).
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(self.model, self.args.liger_kernel_config)
            self.args.use_liger_kernel = False
        patch(self.model, **options)
        self.selector = selector or Selector(select, ratio, granularity, seed)
        if self.selector.needs_reference and reference_model is not None:
            reference_model.eval().requires_grad_(False)
        self.reference_model = reference_model
        self.ignore_index = ignore_index
        self._kept_counts: deque[int] = deque()  # the window's micro-batches, in order
        self._kept_since_log = None  # [kept, valid] rows since the last log (device)
        self._kept_total = 0  # rows kept since training began (device tensor once counted)
        # transformers < 5.20 decides the same from this flag (with num_items_in_batch given).
        self.model_accepts_loss_kwargs = True

    def _check_loss_options(self) -> None:
        """Refuse the Trainer's loss options that this loss cannot honour."""
        if self.args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not supported with token filtering: the fused LM head gives "
                "each row's cross-entropy, not the log-probabilities of the whole vocabulary"
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not used: the loss is the kept rows' mean; override kept_loss() "
                "to change it"
            )
        if self.args.label_names not in (None, ["labels"]):
            raise ValueError(f"label_names={self.args.label_names}: the labels must be the 'labels' column")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (pc.cp_enabled or pc.sp_enabled or pc.tp_enabled):
            raise ValueError("tensor, context and sequence parallelism are not supported with token "
                             "filtering")

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
        counts = [row_counts(self.selector, b, self.ignore_index) for b in batch_samples]
        # Each micro-batch's own count, in the order the Trainer runs them: its
        # selection and plan then need no host sync (compute_loss takes them).
        self._kept_counts = deque(kept for kept, _ in counts)
        totals = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            totals = self.accelerator.gather(totals).view(-1, 2).sum(0)
        # Summed on the device, read at the next log: no host sync per step.
        self._kept_since_log = totals if self._kept_since_log is None else self._kept_since_log + totals
        return batch_samples, totals[0]

    def kept_loss(self, token_loss: torch.Tensor, keep: torch.Tensor, num_kept, inputs: dict) -> torch.Tensor:
        """The loss of one training micro-batch, from its kept rows. Override to change it.

        token_loss: [B, L] float32 (float64 for a float64 model), with grad: row t's
            cross-entropy for predicting token t+1 (0 where not valid).
        keep: [B, L] bool, the rows the selection kept (the compact backward
            already knows them).
        num_kept: the rows kept over the whole accumulation window, all processes
            included when the Trainer averages tokens across devices (the
            Trainer's own ``num_items_in_batch`` counts valid tokens instead).
        inputs: the micro-batch, labels included.
        Returns a scalar. The window's loss is the sum of its micro-batches'
        (nothing divides it by the accumulation steps; several processes are
        taken care of), so dividing by ``num_kept`` gives the mean over the
        window's kept rows, as this default does. Only kept rows may carry loss: a
        loss that sends gradient to a filtered row raises in the backward.
        """
        return (token_loss * keep).sum() / num_kept

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError(f"{type(self).__name__} needs a 'labels' column (unshifted, -100 where no loss)")
        if "shift_labels" in inputs:
            raise ValueError("pre-shifted 'shift_labels' are not supported: give unshifted 'labels'")
        labels = inputs.pop("labels")
        ref_loss = inputs.pop(REFERENCE_COLUMN, None)
        # The patched model takes the labels (HF's ignore value) and returns
        # per-token losses from the fused norm + LM head + cross-entropy: no
        # [B, L, vocab] logits. Hidden states would need the logits path.
        hf_labels = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        outputs = model(**{**inputs, "labels": hf_labels, "use_cache": False, "output_hidden_states": False})
        if getattr(outputs, "token_loss", None) is None:
            raise RuntimeError(
                "the model's forward did not run Centrifuge's fused path (no token_loss): something "
                "replaced the patched forward after the trainer patched the model"
            )
        ref_logits = None
        if self.selector.needs_reference and ref_loss is None:
            if self.reference_model is None:
                raise ValueError("selection 'rho1' needs reference_model=... or a 'reference_loss' column")
            with torch.no_grad():
                ref_logits = self.reference_model(**{**inputs, "use_cache": False}).logits
        count = self._kept_counts.popleft() if self._kept_counts else None
        _, keep = selective_loss(
            outputs, hf_labels, self.selector, reference_logits=ref_logits, reference_loss=ref_loss,
            count=count, return_keep=True,
        )  # fmt: skip
        num_kept = num_items_in_batch
        if num_kept is None:
            # No window count (a custom loop): a per-micro-batch mean, scaled here.
            steps = max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            num_kept = (keep.sum() if count is None else count) * steps
        loss = self.kept_loss(outputs.token_loss, keep, num_kept, {**inputs, "labels": labels})
        across = self.args.average_tokens_across_devices and self.args.world_size > 1
        if num_items_in_batch is not None and across:
            # K counts every process's kept rows; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and self._kept_since_log is not None:
            kept, valid = self._kept_since_log.tolist()
            self._kept_total += kept
            logs["kept_fraction"] = kept / max(valid, 1)
            logs["kept_tokens"] = self._kept_total
            self._kept_since_log = None
        super().log(logs, start_time)


class CentrifugeTrainer(CentrifugeTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains on the selected tokens only, with
    Centrifuge (arguments: :class:`CentrifugeTrainerMixin`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Evaluation: the plain mean loss over every valid row.
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop(REFERENCE_COLUMN, None)
        outputs = model(**inputs, use_cache=False)
        mask, pos = inputs.get("attention_mask"), inputs.get("position_ids")
        valid = valid_rows(labels, mask, pos, self.ignore_index)
        tl = token_losses(outputs.logits, shift_labels(labels, self.ignore_index), self.ignore_index)
        loss = (tl * valid).sum() / valid.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss
