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


def rank_rows(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each entry's place in the selection order of its row: valid entries first,
    then by score descending, ties to the earlier position (deterministic even
    when valid scores tie or are -inf). The top k of row ``i`` are its entries
    of rank < k, and the next ones those of rank k, k + 1, ...

    scores: [R, C] float, valid: [R, C] bool. Returns [R, C] int64 ranks 0..C-1.
    """
    # Two stable sorts give the order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    by_valid = torch.sort(valid.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True)
    order = order.gather(1, by_valid.indices)
    places = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


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

    def count(self, valid: torch.Tensor, ratio: float | None = None) -> int:
        """How many rows :meth:`__call__` keeps given the valid mask ([B, L] bool),
        known before any loss exists: a training step normalizes its loss by the
        kept rows of all its micro-batches (and processes) before running them.
        ratio: another ratio than ``self.ratio`` (a backward ratio, :meth:`select`)."""
        if not self.filters:
            return int(valid.sum())
        ratio = self.ratio if ratio is None else ratio
        if self.granularity == "batch":
            return num_keep(int(valid.sum()), ratio)
        return sum(num_keep(int(n), ratio) for n in valid.sum(1).tolist())

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
        return self.select(token_loss, valid, ref_loss, count)[0]

    def select(
        self,
        token_loss: torch.Tensor,
        valid: torch.Tensor,
        ref_loss: torch.Tensor | None = None,
        count: int | None = None,
        backward_ratio: float | None = None,
        backward_count: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep, ranked): the keep mask of :meth:`__call__` and, given a
        ``backward_ratio`` ρ_b >= ratio, the valid rows ranked next by the same
        scores (the same random draw for ``random``): ranks ceil(ρ·n) ..
        ceil(ρ_b·n) - 1 of the batch's n valid rows (``batch``), or of each row's
        (``sequence``), so that keep | ranked is what ratio ρ_b would keep
        (``BackwardOptions.backward_ratio``: they join the backward without a
        loss). ranked is None without a backward ratio, and empty when nothing is
        filtered. backward_count: :meth:`count` at ``backward_ratio``, needed with
        ``count`` (no host sync). All masks [B, L] bool."""
        if valid.shape != token_loss.shape:
            raise ValueError(
                f"valid mask has shape {tuple(valid.shape)}, token losses {tuple(token_loss.shape)}"
            )
        no_sync = count is not None
        if backward_ratio is not None:
            backward_ratio = check_ratio(backward_ratio)
            if self.method != "none" and backward_ratio < self.ratio:
                raise ValueError(f"backward ratio {backward_ratio} is below the keep ratio "
                                 f"{self.ratio}: the backward set holds the kept rows")  # fmt: skip
            if no_sync and backward_count is None:
                raise ValueError("a selection with a host count and a backward ratio needs "
                                 "backward_count (Selector.count at the backward ratio) too")  # fmt: skip
        if not (count if no_sync else bool(valid.any())):
            raise ValueError(
                "the batch has no valid token (all labels are ignore_index, padding or "
                "document ends): nothing to train on"
            )
        if not self.filters:
            if self.method == "rho1":
                self.scores(token_loss, ref_loss)  # still validate the reference
            return valid.clone(), None if backward_ratio is None else torch.zeros_like(valid)
        scores = self.scores(token_loss, ref_loss)
        nan = (torch.isnan(scores) & valid).any()
        if no_sync:
            torch._assert_async(~nan, "selection scores contain NaN (a NaN loss or reference loss)")
        elif nan:
            raise ValueError("selection scores contain NaN (a NaN loss or reference loss)")
        if self.granularity == "batch":
            rank = rank_rows(scores.reshape(1, -1), valid.reshape(1, -1)).view_as(valid)
            n = None if no_sync else int(valid.sum())
            k = count if no_sync else num_keep(n, self.ratio)
            kb = None if backward_ratio is None else backward_count if no_sync else num_keep(n, backward_ratio)
        else:  # per row, from each row's valid count (looked up on the device)
            rank = rank_rows(scores, valid)
            k = self._keep_per_row(valid, self.ratio)[:, None]
            kb = None if backward_ratio is None else self._keep_per_row(valid, backward_ratio)[:, None]
        keep = (rank < k) & valid
        return keep, None if kb is None else (rank >= k) & (rank < kb) & valid

    def _keep_per_row(self, valid: torch.Tensor, ratio: float) -> torch.Tensor:
        """[B] int64 :func:`num_keep` at ``ratio`` of every row's valid count, looked
        up on the device in a table of all counts 0..L (made once per length, ratio
        and device), so that no row count travels to the host."""
        key = (valid.shape[1], ratio, valid.device)
        if key not in self._row_counts:
            counts = [num_keep(n, ratio) for n in range(valid.shape[1] + 1)]
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
