"""Tensor parallelism with sequence parallelism (Megatron style) inside the
native model's own Functions.

A decoder layer is one autograd Function with a hand-written compact backward,
so its weights cannot be split by wrapping nn.Linear modules: the layer holds
its rank's column (wq, wk, wv, wg, wu: by heads / by F) and row (wo, wd) shards
and does the collectives itself. Between layers the residual stream is split
by rows (sequence parallel): rank r holds flat rows [r·N/tp, (r+1)·N/tp) of the
N = B·L rows. The forward all-gathers the normalized rows before the QKV and
gate/up GEMMs and reduce-scatters after wo and wd; the backward does the
transposes on the rows it runs on, so under Centrifuge every collective of
the backward carries the kept rows only (docs/parallelism.md has the bytes).

Kept rows fall unevenly on the ranks; a collective on them is padded to the
largest rank's count (:class:`RowSplit`). The plan (which rows are kept) is the
same on every rank: the LM head computes each rank's rows' losses and
all-gathers them (:meth:`TPGroup.gather_loss`), so the selection sees every
row's loss everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a weight: the local shard of a DTensor (tensor
    parallel, or FSDP with tensor parallel), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(eq=False)
class RowSplit:
    """A set of rows (every row, or the sorted kept rows of a plan) split over
    the tensor-parallel ranks by the row ranges they own.

    local: [n_r] indices of this rank's rows of the set into its own rows (None:
    all of them); count: n_r; counts: every rank's n_r (host ints), whose max
    pads the collectives; pos: [n] positions of the set's rows in the padded
    [tp·max, ...] buffer (None when nothing is padded: every row)."""

    tp: "TPGroup"
    local: torch.Tensor | None
    counts: list[int]
    pos: torch.Tensor | None

    @property
    def width(self) -> int:
        return max(self.counts)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[n_r, ...] rows of this rank -> [n, ...] every rank's, in row order."""
        out = t.new_empty(self.tp.size * self.width, *t.shape[1:])
        if self.pos is None:
            dist.all_gather_into_tensor(out, t.contiguous(), group=self.tp.group)
            return out
        pad = t.new_zeros(self.width, *t.shape[1:])
        pad[: t.shape[0]] = t
        dist.all_gather_into_tensor(out, pad, group=self.tp.group)
        return out.index_select(0, self.pos)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """[n, ...] partial sums on every rank -> [n_r, ...] the sums of this rank's rows."""
        out = t.new_empty(self.width, *t.shape[1:])
        if self.pos is None:
            dist.reduce_scatter_tensor(out, t.contiguous(), group=self.tp.group)
            return out
        pad = t.new_zeros(self.tp.size * self.width, *t.shape[1:]).index_copy_(0, self.pos, t)
        dist.reduce_scatter_tensor(out, pad, group=self.tp.group)
        return out[: self.counts[self.tp.rank]]


class _GatherLoss(torch.autograd.Function):
    """All-gather of per-row losses. The loss built on them is the same on every
    rank, so each rank's gradient is its own rows' part of the (replicated)
    upstream gradient: a slice, not a sum."""

    @staticmethod
    def forward(ctx, t, tp):
        ctx.tp = tp
        return tp.every(t.shape[0] * tp.size).gather(t)

    @staticmethod
    def backward(ctx, d):
        lo, hi = ctx.tp.row_range(d.shape[0])
        return d[lo:hi], None


class TPGroup:
    """The tensor-parallel ranks of one data-parallel replica: ``size`` ranks of
    process group ``group``, this one ``rank`` among them."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def row_range(self, n_rows: int) -> tuple[int, int]:
        """[lo, hi): this rank's rows of a forward of ``n_rows`` flat rows."""
        if n_rows % self.size:
            raise ValueError(f"tensor parallelism splits the {n_rows} rows of a micro-batch "
                             f"(batch_size x seq_len) over {self.size} ranks: make it divisible")  # fmt: skip
        per = n_rows // self.size
        return self.rank * per, (self.rank + 1) * per

    def every(self, n_rows: int) -> RowSplit:
        """Every row of a forward of ``n_rows`` rows (equal parts: no padding)."""
        lo, hi = self.row_range(n_rows)
        return RowSplit(self, None, [hi - lo] * self.size, None)

    def split(self, plan, idx: torch.Tensor | None) -> RowSplit:
        """The rows ``idx`` ([n] sorted flat indices of ``plan``'s rows; None:
        every row), computed once per plan and row set: the ranks' counts are
        read on the host (one sync per plan and set on a GPU)."""
        n_rows = plan.shape[0] * plan.shape[1]
        if idx is None:
            return self.every(n_rows)
        key = ("tp-rows", idx.data_ptr(), idx.numel())
        split = plan.derived.get(key)
        if split is None:
            lo, hi = self.row_range(n_rows)
            owner = torch.div(idx, hi - lo, rounding_mode="floor")
            counts = torch.bincount(owner, minlength=self.size).tolist()
            start = sum(counts[: self.rank])
            width = max(counts)
            first = torch.tensor([sum(counts[:r]) for r in range(self.size)], device=idx.device)
            pos = owner * width + torch.arange(idx.numel(), device=idx.device) - first[owner]
            split = RowSplit(self, idx[start : start + counts[self.rank]] - lo, counts, pos)
            plan.derived[key] = split
        return split

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a flat [N, ...] tensor."""
        lo, hi = self.row_range(t.shape[0])
        return t[lo:hi]

    def gather_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """[N/tp] this rank's per-row losses -> [N] every row's, differentiable."""
        return _GatherLoss.apply(loss, self)

    def local_plan(self, plan) -> "RankPlan":
        return RankPlan(self, plan)


class RankPlan:
    """A plan as the LM head of one rank reads it: ``keep_idx`` are this rank's
    kept rows, as indices into its own rows (None: a dense backward)."""

    def __init__(self, tp: TPGroup, plan):
        self.tp, self.plan = tp, plan

    @property
    def keep_idx(self) -> torch.Tensor | None:
        idx = self.plan.keep_idx
        return None if idx is None else self.tp.split(self.plan, idx).local
