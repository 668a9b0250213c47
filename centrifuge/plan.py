"""The per-forward plan: which rows the backward pass runs on.

A :class:`Plan` is created when a forward pass starts, captured by every op
of that pass, filled by the selection once the per-token losses exist, and
read by every backward. Until it is filled (or in ``exact`` mode) the
backward is ordinary dense training.

Row ``t`` of a sequence carries the loss for predicting token ``t + 1``; a
row is kept or filtered as a whole (its loss and its K/V go together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKWARD_MODES = ("amplified", "exact")


@dataclass
class Layout:
    """Attention layout of a batch of (possibly packed) rows.

    position_ids: [B, L] int64, restarting at 0 in every document.
    segment_ids:  [B, L] int64, the document index inside its row (non-decreasing);
                  a query attends to keys of its own segment at positions <= its own.
    cu_seqlens:   [n_docs + 1] int32, document boundaries over the flat B*L tokens
                  (the varlen layout flash-attention kernels take).
    max_seqlen:   the longest document.
    """

    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.position_ids.shape)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens.numel() - 1 > self.position_ids.shape[0]

    @staticmethod
    def build(
        batch: int,
        seqlen: int,
        device: torch.device | str = "cpu",
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> "Layout":
        """Derive documents from ``position_ids`` (a restart at 0, or any break in
        +1 steps, starts a document) and from ``attention_mask`` (padding forms its
        own segments, so real tokens never attend to it)."""
        if attention_mask is not None and attention_mask.shape != (batch, seqlen):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seqlen)}"
            )
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        position_ids = position_ids.to(device=device, dtype=torch.long)
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(batch, seqlen)
        if position_ids.shape != (batch, seqlen):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}, expected {(batch, seqlen)}"
            )
        starts = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if attention_mask is not None:
            m = attention_mask.to(device=device).bool()
            starts[:, 1:] |= m[:, 1:] != m[:, :-1]
        segment_ids = starts.long().cumsum(-1) - 1
        flat_starts = torch.nonzero(starts.reshape(-1)).squeeze(1)
        total = torch.tensor([batch * seqlen], device=device)
        cu = torch.cat([flat_starts, total]).to(torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return Layout(position_ids.contiguous(), segment_ids, cu, max_seqlen)

    def last_rows(self) -> torch.Tensor:
        """[B, L] bool: the last row of every segment (it has no next token)."""
        last = torch.ones_like(self.segment_ids, dtype=torch.bool)
        last[:, :-1] = self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
        return last


class Plan:
    """Which rows of one forward pass the backward runs on.

    ``keep_idx`` holds the sorted flat indices (into ``B * L``) of kept rows once
    :meth:`set_keep` ran in ``amplified`` mode; it stays ``None`` (dense backward)
    in ``exact`` mode, where only the loss is masked.
    """

    def __init__(self, layout: Layout, mode: str = "amplified"):
        if mode not in BACKWARD_MODES:
            raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
        self.layout = layout
        self.mode = mode
        self.keep_idx: torch.Tensor | None = None
        self.n_keep: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def compact(self) -> bool:
        """True when the backward runs on kept rows only."""
        return self.keep_idx is not None

    def set_keep(self, keep: torch.Tensor) -> None:
        """Record the kept rows. keep: [B, L] bool."""
        if keep.shape != self.shape:
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected {self.shape}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep mask must be bool, got {keep.dtype}")
        idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
        self.n_keep = int(idx.numel())
        if self.n_keep == 0:
            raise ValueError("the keep mask keeps no token: the filtered loss would be undefined")
        if self.mode == "amplified" and self._filtered_rows_matter(keep):
            self.keep_idx = idx

    def _filtered_rows_matter(self, keep: torch.Tensor) -> bool:
        """A filtered row gets a gradient in dense training only through a later
        kept row of its own document. With none (ρ = 1: only document ends and
        padding are filtered) the dense backward computes the same gradients
        without gathering, so the plan stays dense."""
        B, L = self.shape
        pos = torch.arange(L, device=keep.device).expand(B, L)
        doc = self.layout.segment_ids + torch.arange(B, device=keep.device)[:, None] * L
        last_kept = torch.full((B * L,), -1, device=keep.device, dtype=torch.long)
        last_kept.scatter_reduce_(0, doc[keep], pos[keep], "amax")
        return bool((~keep & (pos < last_kept[doc])).any())

    def loss(self, token_loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean of the kept rows' losses, and the plan filled for the backward.

        token_loss: [B, L] float (with grad), keep: [B, L] bool.
        """
        if token_loss.shape != self.shape:
            raise ValueError(
                f"token_loss has shape {tuple(token_loss.shape)}, expected {self.shape}"
            )
        self.set_keep(keep)
        # A masked sum, not an index: the gradient of a [B, L] vector costs nothing.
        return (token_loss * keep).sum() / self.n_keep
