"""Token selection: score every valid row, keep the top ``ceil(ratio * n_valid)``.

Methods
-------
``rho1``    excess loss = model loss - reference loss (Rho-1); the reference loss
            comes from a reference model run without grad, or is precomputed and
            stored with the data.
``loss``    the model's own loss, highest kept.
``random``  uniform scores, from the selector's own seeded generator, a given
            generator, or torch's default generator (``seed`` below).
``none``    keep every valid row (plain training; ``ratio`` is ignored).

A caller that computes its own scores passes an explicit keep mask to
:meth:`centrifuge.plan.Plan.loss` instead (see :func:`keep_from_mask`).

Invalid rows (``ignore_index`` labels, padding, prompt tokens, the last row of
every document) are never kept and never counted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

METHODS = ("rho1", "loss", "random", "none")
GRANULARITIES = ("batch", "sequence")


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"keep ratio must lie in (0, 1], got {ratio}")
    return ratio


def num_keep(n_valid: int, ratio: float) -> int:
    """ceil(ratio * n_valid), computed so that e.g. 0.3 * 10 gives 3, not 4."""
    return min(n_valid, math.ceil(round(ratio * n_valid, 9)))


def top_k_rows(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Keep the ``k[i]`` highest-scoring valid entries of each row ``i``.

    scores: [R, C] float, valid: [R, C] bool, k: [R] int64, or an int for every
    row (no host-to-device copy: a captured step replays without one).
    Ties go to the earlier position; invalid entries are never chosen.
    Returns [R, C] bool.
    """
    # Two stable sorts give the order (valid first, then score descending, then
    # position): deterministic even when valid scores tie or are -inf.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    by_valid = torch.sort(valid.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True)
    order = order.gather(1, by_valid.indices)
    rank = torch.arange(scores.shape[1], device=scores.device)[None, :]
    rank_ok = rank < (k if isinstance(k, int) else k[:, None])
    keep = torch.zeros_like(valid)
    keep.scatter_(1, order, rank_ok)
    return keep & valid


@dataclass
class Selector:
    """Picks the rows to keep. ``Selector("rho1", 0.5)(token_loss, valid, ref_loss)``.

    method:      one of ``rho1``, ``loss``, ``random``, ``none``.
    ratio:       fraction of valid rows kept, in (0, 1].
    granularity: ``batch`` (one top-k over the whole batch) or ``sequence``
                 (top-k inside every row of the batch).
    seed:        where ``random`` draws its scores (as scikit-learn's
                 ``random_state``). An int: a generator of the selector's own,
                 seeded with it once, so every call draws new scores and two
                 selectors with one seed draw the same sequence (its state is in
                 :meth:`state_dict`). A ``torch.Generator``: that one, the scores
                 drawn on its device. None: torch's default CPU generator, seeded
                 by ``torch.manual_seed`` and restored by whatever restores torch's
                 RNG state (``transformers.Trainer`` checkpoints do).
    """

    method: str = "rho1"
    ratio: float = 0.5
    granularity: str = "batch"
    seed: int | torch.Generator | None = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r}; choose one of {METHODS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}"
            )
        self.ratio = check_ratio(self.ratio)
        if not (self.seed is None or isinstance(self.seed, (numbers.Integral, torch.Generator))):
            raise ValueError(
                f"seed must be an int, a torch.Generator or None, got {type(self.seed).__name__}"
            )
        # None until the first draw (a seed) or for torch's default generator.
        self._generator = self.seed if isinstance(self.seed, torch.Generator) else None
        self._row_counts: dict[tuple, torch.Tensor] = {}

    @property
    def needs_reference(self) -> bool:
        return self.method == "rho1"

    def count(self, valid: torch.Tensor) -> int:
        """How many rows :meth:`__call__` keeps given the valid mask ([B, L] bool),
        known before any loss exists: a training step normalizes its loss by the
        kept rows of all its micro-batches (and processes) before running them."""
        if not self.filters:
            return int(valid.sum())
        if self.granularity == "batch":
            return num_keep(int(valid.sum()), self.ratio)
        return sum(num_keep(int(n), self.ratio) for n in valid.sum(1).tolist())

    def state_dict(self) -> dict:
        """The state of the generator ``random`` draws from, for exact resume;
        empty before the first draw and for torch's default generator (whose
        state belongs to whoever saves torch's RNG state)."""
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" not in state:
            return
        if self.seed is None:
            raise ValueError(
                "this selector draws from torch's default generator (seed=None), but the "
                "state holds a generator of its own: restore it into a selector with a seed"
            )
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.set_state(state["generator"])

    def scores(
        self, token_loss: torch.Tensor, ref_loss: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, L] float32 scores, higher = more worth training on."""
        token_loss = token_loss.detach().float()
        if self.method == "rho1":
            if ref_loss is None:
                raise ValueError(
                    "selection 'rho1' needs reference losses: pass ref_loss from a reference "
                    "model or from precomputed reference scores"
                )
            if ref_loss.shape != token_loss.shape:
                raise ValueError(
                    f"reference losses have shape {tuple(ref_loss.shape)}, but the batch's "
                    f"token losses have shape {tuple(token_loss.shape)}"
                )
            return token_loss - ref_loss.detach().to(token_loss)
        if self.method == "loss":
            return token_loss
        if self.method == "random":
            if self._generator is None and self.seed is not None:
                self._generator = torch.Generator().manual_seed(int(self.seed))
            g = self._generator
            device = "cpu" if g is None else g.device
            return torch.rand(token_loss.shape, generator=g, device=device).to(token_loss.device)
        return torch.zeros_like(token_loss)

    @property
    def filters(self) -> bool:
        """False when every valid row is kept (``none``, or ratio 1)."""
        return self.method != "none" and self.ratio < 1.0

    def __call__(
        self,
        token_loss: torch.Tensor,
        valid: torch.Tensor,
        ref_loss: torch.Tensor | None = None,
        count: int | None = None,
    ) -> torch.Tensor:
        """token_loss: [B, L] float, valid: [B, L] bool, ref_loss: [B, L] (rho1).
        count: :meth:`count` of ``valid``, computed beforehand on the host (e.g. from
        the CPU batch): with it the selection runs without a host sync, and NaN
        scores are caught by an asynchronous device assert instead of an
        exception. Returns the keep mask, [B, L] bool."""
        if valid.shape != token_loss.shape:
            raise ValueError(
                f"valid mask has shape {tuple(valid.shape)}, token losses {tuple(token_loss.shape)}"
            )
        no_sync = count is not None
        if not (count if no_sync else bool(valid.any())):
            raise ValueError(
                "the batch has no valid token (all labels are ignore_index, padding or "
                "document ends): nothing to train on"
            )
        if not self.filters:
            if self.method == "rho1":
                self.scores(token_loss, ref_loss)  # still validate the reference
            return valid.clone()
        scores = self.scores(token_loss, ref_loss)
        nan = (torch.isnan(scores) & valid).any()
        if no_sync:
            torch._assert_async(~nan, "selection scores contain NaN (a NaN loss or reference loss)")
        elif nan:
            raise ValueError("selection scores contain NaN (a NaN loss or reference loss)")
        if self.granularity == "batch":
            k = count if no_sync else num_keep(int(valid.sum()), self.ratio)
            keep = top_k_rows(scores.reshape(1, -1), valid.reshape(1, -1), k)
            return keep.view_as(valid)
        return top_k_rows(scores, valid, self._keep_per_row(valid))

    def _keep_per_row(self, valid: torch.Tensor) -> torch.Tensor:
        """[B] int64 :func:`num_keep` of every row's valid count, looked up on the
        device in a table of all counts 0..L (made once per length, ratio and
        device), so that no row count travels to the host."""
        key = (valid.shape[1], self.ratio, valid.device)
        if key not in self._row_counts:
            counts = [num_keep(n, self.ratio) for n in range(valid.shape[1] + 1)]
            self._row_counts[key] = torch.tensor(counts, device=valid.device)
        return self._row_counts[key][valid.sum(1)]


def keep_from_mask(keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """An explicit keep mask supplied by the caller, restricted to valid rows.

    keep, valid: [B, L] bool.
    """
    if keep.shape != valid.shape:
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected {tuple(valid.shape)}")
    keep = keep.bool() & valid
    if not bool(keep.any()):
        raise ValueError("the keep mask keeps no valid token: the filtered loss would be undefined")
    return keep
