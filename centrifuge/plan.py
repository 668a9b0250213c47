"""The per-forward plan: which rows the backward pass runs on.

A :class:`Plan` is created when a forward pass starts, captured by every op
of that pass, filled by the selection once the per-token losses exist, and
read by every backward. Until it is filled (or in ``exact`` mode) the
backward is ordinary dense training.

Row ``t`` of a sequence carries the loss for predicting token ``t + 1``; a
row is kept or filtered as a whole (its loss and its K/V go together).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

BACKWARD_MODES = ("amplified", "exact")
BACKWARD_PATHS = ("auto", "compact", "dense")
CONTEXT_MODES = ("backward", "constant")
# ``auto`` runs the compact backward from this much GEMM work per layer on
# (tokens of a forward x parameters of a decoder layer) and the dense path
# below it, where launches and host syncs outweigh the FLOPs saved
# (docs/benchmarks.md, "Small models", has the measurements behind it). The
# environment variable overrides it for other hardware (0: always compact).
COMPACT_MIN_WORK = float(os.environ.get("CENTRIFUGE_COMPACT_MIN_WORK", 2.0e11))


class BackwardOptions:
    """How the backward treats filtered rows (docs/design.md, "Quality knobs").

    mode:          ``amplified`` (Centrifuge) or ``exact`` (masked loss, dense backward).
    extra:         p in [0, 1]. Each filtered row that precedes a kept row of its
                   document joins the backward set with probability p (drawn per
                   forward from this object's seeded generator); it carries no loss,
                   and the K/V gradient it receives from *other* rows' queries is
                   multiplied by ``extra_weight``.
    extra_weight:  that weight; None means 1/p, which makes the gradient an
                   unbiased estimate of the exact masked-loss gradient. A value in
                   [1, 1/p] damps it (biased, lower variance).
    exact_layers:  the bottom k decoder layers run the exact (dense) backward; the
                   layers above stay compact.
    context:       what the backward does with *context rows*, real tokens that have
                   no loss by construction (label ``ignore_index`` on a prompt, system or
                   tool turn; :meth:`Plan.set_context`): ``backward`` (default) keeps them
                   in the backward set with no loss, their K/V gradient flowing as under a
                   masked loss, so keeping every labelled row gives the plain model's
                   gradient; ``constant`` treats them like filtered rows (cheaper, and a
                   different gradient: docs/design.md, "Context rows").
    seed:          seeds the sampling generator (CPU; ``generator`` holds its state).
    path:          how an amplified backward is computed, never what: ``compact``
                   gathers the kept rows (dimension-reduced GEMMs); ``dense`` runs
                   full-size GEMMs with the filtered rows' K/V gradients zeroed (the
                   same gradients, no gathers and no index syncs: cheaper for small
                   models); ``auto`` picks by the GEMM work per layer
                   (:func:`choose_path`). Sampled rows (``extra``) need ``compact``.
    """

    def __init__(self, mode: str = "amplified", extra: float = 0.0,
                 extra_weight: float | None = None, exact_layers: int = 0, seed: int = 0,
                 path: str = "auto", context: str = "backward"):  # fmt: skip
        if mode not in BACKWARD_MODES:
            raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
        if path not in BACKWARD_PATHS:
            raise ValueError(f"backward path must be one of {BACKWARD_PATHS}, got {path!r}")
        if context not in CONTEXT_MODES:
            raise ValueError(f"backward context must be one of {CONTEXT_MODES}, got {context!r}")
        if path != "auto" and mode != "amplified":
            raise ValueError(f"backward path {path!r} applies to the amplified backward only")
        if path == "dense" and extra > 0:
            raise ValueError("backward extra (sampled rows) needs path 'compact' (or 'auto')")
        extra = float(extra)
        if not 0.0 <= extra <= 1.0:
            raise ValueError(f"backward extra (sampling probability p) must lie in [0, 1], got {extra}")
        if extra_weight is not None:
            extra_weight = float(extra_weight)
            if extra == 0.0:
                raise ValueError("backward extra_weight needs extra > 0 (no filtered row is sampled)")
            if not 1.0 <= extra_weight <= 1.0 / extra * (1 + 1e-9):
                raise ValueError(
                    f"backward extra_weight must lie in [1, 1/p] = [1, {1 / extra:g}], got {extra_weight}"
                )
        if int(exact_layers) != exact_layers or exact_layers < 0:
            raise ValueError(f"exact_layers must be a non-negative integer, got {exact_layers!r}")
        if mode == "exact" and (extra > 0 or exact_layers > 0):
            raise ValueError(
                "backward extra / exact_layers modify the amplified backward; mode 'exact' is "
                "already the dense backward"
            )
        self.mode, self.extra, self.exact_layers, self.seed = mode, extra, int(exact_layers), seed
        self.path, self.context = path, context
        self.weight = (1.0 / extra if extra > 0 else 1.0) if extra_weight is None else extra_weight
        self.generator = torch.Generator().manual_seed(seed)

    def check_layers(self, num_layers: int) -> None:
        if self.exact_layers > num_layers:
            raise ValueError(f"exact_layers={self.exact_layers} exceeds the model's {num_layers} layers")

    def choose_path(self, tokens: int, layer_params: int, device_type: str = "cuda") -> str:
        """``compact`` or ``dense`` for a forward of ``tokens`` rows through decoder
        layers of ``layer_params`` parameters on ``device_type`` (``path`` unless it
        is ``auto``). Only a GPU step can be bound by kernel launches; on the CPU
        the FLOPs saved always pay (compact)."""
        if self.path != "auto":
            return self.path
        if self.extra > 0 or device_type != "cuda" or tokens * layer_params >= COMPACT_MIN_WORK:
            return "compact"
        return "dense"

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> "BackwardOptions":
        """Amplified options from ``"extra=0.3,extra_weight=1.5,exact_layers=2,path=dense,
        context=constant"`` (any subset; ``""`` = plain amplified), as the bench's
        ``--knob`` takes them."""
        kw = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("extra", "extra_weight", "exact_layers", "path", "context"):
                raise ValueError(
                    f"bad backward option {item!r} in {spec!r}: expected extra=P, extra_weight=W, "
                    "exact_layers=K, path=auto|compact|dense or context=backward|constant, "
                    "separated by commas"
                )
            kw[key] = {"exact_layers": int, "path": str, "context": str}.get(key, float)(value)
        return cls("amplified", seed=seed, **kw)

    @classmethod
    def of(cls, backward: "str | BackwardOptions") -> "BackwardOptions":
        return backward if isinstance(backward, BackwardOptions) else cls(backward)

    def __repr__(self) -> str:
        return (f"BackwardOptions({self.mode!r}, extra={self.extra:g}, weight={self.weight:g}, "
                f"exact_layers={self.exact_layers}, path={self.path!r}, context={self.context!r})")  # fmt: skip

    def describe(self) -> str:
        """Short label: ``amplified``, ``amplified+extra0.3``, ``amplified+exact2``, ..."""
        s = self.mode
        if self.extra > 0:
            s += f"+extra{self.extra:g}"
            if not math.isclose(self.weight, 1.0 / self.extra):
                s += f"(w{self.weight:g})"
        if self.exact_layers:
            s += f"+exact{self.exact_layers}"
        if self.path != "auto":
            s += f"+{self.path}"
        if self.context != "backward":
            s += f"+context-{self.context}"
        return s


def select_rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of ``t`` (every row for None: a dense plan)."""
    return t if idx is None else t[idx]


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices [count] of the True entries of a 1-D bool mask that holds
    exactly ``count`` of them, without a host sync (``nonzero`` has to wait for
    the device to learn its output size): each True entry is written to its
    rank; False entries all go to a spare slot that is dropped."""
    rank = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask, rank, count)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))[:count]


@dataclass
class ExtraRows:
    """Sampled filtered rows inside a layer's backward set.

    pos:    [m] int64 positions in the backward rows (``Plan.rows_idx``).
    weight: multiplies their K/V gradient from other rows' queries.
    """

    pos: torch.Tensor
    weight: float


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
        own segments, so real tokens never attend to it).

        The layout is computed where its inputs live and then moved to ``device``:
        from CPU position ids (or none and no mask) nothing waits for the GPU, while
        a GPU-side computation would sync twice (the document starts and the
        longest document are sizes the host needs)."""
        if attention_mask is not None and attention_mask.shape != (batch, seqlen):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seqlen)}"
            )
        if position_ids is None and attention_mask is None:
            # One document per row: every size is known on the host, so nothing
            # waits for the device (and torch.compile traces it without a break).
            pos = torch.arange(seqlen, device=device).expand(batch, seqlen).contiguous()
            segment_ids = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
            return Layout(pos, segment_ids, cu, seqlen)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        src = position_ids.device
        position_ids = position_ids.to(dtype=torch.long)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        # Two comparisons, not `rows in (1, batch)`: torch.compile (2.13) decides
        # that as False when batch is a symbolic size and rows a static one.
        rows = position_ids.shape[0]
        if position_ids.dim() != 2 or position_ids.shape[1] != seqlen or (rows != 1 and rows != batch):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}, expected {(batch, seqlen)} "
                f"(or [1, {seqlen}] / [{seqlen}] for every row)"
            )
        position_ids = position_ids.expand(batch, seqlen)
        starts = torch.ones(batch, seqlen, dtype=torch.bool, device=src)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if attention_mask is not None:
            m = attention_mask.to(device=src).bool()
            starts[:, 1:] |= m[:, 1:] != m[:, :-1]
        segment_ids = starts.long().cumsum(-1) - 1
        flat_starts = torch.nonzero(starts.reshape(-1)).squeeze(1)
        total = torch.tensor([batch * seqlen], device=src)
        cu = torch.cat([flat_starts, total]).to(torch.int32)
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return Layout(position_ids.contiguous().to(device), segment_ids.to(device), cu.to(device), max_seqlen)

    def last_rows(self) -> torch.Tensor:
        """[B, L] bool: the last row of every segment (it has no next token)."""
        last = torch.ones_like(self.segment_ids, dtype=torch.bool)
        last[:, :-1] = self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
        return last


def precedes(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, L] bool: rows before the last True row of ``mask`` ([B, L] bool) in
    their document, the rows whose K/V a later row of ``mask`` reads."""
    B, L = mask.shape
    dev = mask.device
    pos = torch.arange(L, device=dev).expand(B, L)
    doc = layout.segment_ids.to(dev) + torch.arange(B, device=dev)[:, None] * L
    last = torch.full((B * L,), -1, device=dev, dtype=torch.long)
    # Every row scatters (-1 where mask is False): no boolean indexing, which
    # would wait for the device to learn how many rows it selects.
    last.scatter_reduce_(0, doc.reshape(-1), torch.where(mask, pos, -1).reshape(-1), "amax")
    return pos < last[doc]


def context_rows(valid: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, L] bool: the context rows of a batch, rows without a target (an
    ``ignore_index`` label: prompt, system, tool turns) that precede a row with
    one in their document, so a masked loss sends their K/V gradient. Never
    context: padding (its own segments hold no target), a document's last row,
    and the unlabelled tail of a document. valid: [B, L] bool, rows with a target."""
    return ~valid & precedes(valid, layout)


class Plan:
    """Which rows of one forward pass the backward runs on.

    ``keep_idx`` holds the sorted flat indices (into ``B * L``) of kept rows once
    :meth:`set_keep` ran in ``amplified`` mode; it stays ``None`` (dense backward)
    in ``exact`` mode, where only the loss is masked. The LM head and final norm
    differentiate ``keep_idx``; decoder layers ask :meth:`rows_for`, which adds
    the context rows (:meth:`set_context`) and the sampled filtered rows
    (``BackwardOptions.extra``) and returns no rows (dense) for the bottom
    ``exact_layers``.
    """

    def __init__(self, layout: Layout, mode: "str | BackwardOptions" = "amplified",
                 path: str = "compact"):  # fmt: skip
        self.options = BackwardOptions.of(mode)
        self.layout = layout
        self.mode = self.options.mode
        if path not in ("compact", "dense"):
            raise ValueError(f"a plan's path is 'compact' or 'dense' (choose_path), got {path!r}")
        if path == "dense" and self.options.extra > 0:
            raise ValueError("sampled rows (extra) need the compact path")
        self.path = path
        # [B, L] bool rows with a target, from a forward with labels: the context
        # rows derive from it when first read, unless set_context gave them.
        self.valid: torch.Tensor | None = None
        self._context: torch.Tensor | None = None  # [B, L] bool
        self.context_count: int | None = None  # its True entries, when known on the host
        self.kv_mask: torch.Tensor | None = None  # [B * L] bool, the dense path's backward rows
        self.keep_idx: torch.Tensor | None = None
        self.n_keep: int | None = None
        self.sampled: torch.Tensor | None = None  # [B, L] bool, filtered rows drawn into the backward
        self.rows_idx: torch.Tensor | None = None  # sorted flat indices: kept + context + sampled rows
        self.extra: ExtraRows | None = None
        # Values derived from the filled plan, computed once for all layers (the
        # row split of tensor parallelism, models/tensor_parallel.py).
        self.derived: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def compact(self) -> bool:
        """True when the backward gathers its rows (kept, context and sampled ones)."""
        return self.keep_idx is not None

    def check_keep(self, keep: torch.Tensor) -> None:
        """Raise unless ``keep`` is a [B, L] bool mask of this plan's rows."""
        if keep.shape != self.shape:
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected {self.shape}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep mask must be bool, got {keep.dtype}")

    @property
    def context(self) -> torch.Tensor | None:
        """[B, L] bool context rows (:func:`context_rows`); None when unknown. Derived
        from ``valid`` on first use: a step whose context rows came from the host
        (:meth:`set_context`) or whose backward is exact never computes them."""
        if self._context is None and self.valid is not None:
            self._context = context_rows(self.valid, self.layout)
        return self._context

    def set_context(self, context: torch.Tensor) -> None:
        """Record the context rows ([B, L] bool, :func:`context_rows`): no loss, but
        in the backward set unless ``BackwardOptions.context`` is ``constant``.
        A CPU mask is counted here, on the host; for a device mask the compact
        path learns the count with one host sync."""
        self.check_keep(context)
        on_host = context.device.type == "cpu"
        self.context_count = int(context.sum()) if on_host else None
        # None at all (pretraining): the mask is never read, so no copy to the device.
        self._context = context if self.context_count == 0 else context.to(self.layout.position_ids.device)

    def _backward_context(self) -> torch.Tensor | None:
        """The context rows that join the backward set (None: none do)."""
        if self.options.context != "backward" or self.context_count == 0:
            return None
        return self.context

    def set_keep(self, keep: torch.Tensor, count: int | None = None) -> None:
        """Record the kept rows. keep: [B, L] bool (never a context row).

        count: ``keep.sum()``, known on the host beforehand (a selection that
        filters: :meth:`Selector.count`). With it (and a host-known context count)
        nothing here waits for the device (the count is checked by an
        asynchronous device assert), and the plan is compact without first
        asking whether any filtered row matters (with ratio < 1 one nearly always
        does; compact is exact either way). Sampled rows (``extra``) still need
        two index syncs."""
        self.check_keep(keep)
        if count is not None:
            torch._assert_async(keep.sum() == count, "keep mask and kept count disagree")
        self.n_keep = int(keep.sum()) if count is None else count
        if self.n_keep == 0:
            raise ValueError("the keep mask keeps no token: the filtered loss would be undefined")
        if self.mode != "amplified":
            return
        ctx = self._backward_context()
        rows = keep if ctx is None else keep | ctx
        if self.path == "dense":  # no row gathered: the layers zero filtered K/V gradients
            self.kv_mask = rows.reshape(-1)
            return
        if count is None:  # one sync learns both whether to gather and how many rows
            matter, n_rows = torch.stack([self._filtered_rows_that_matter(keep, rows).sum(),
                                          rows.sum()]).tolist()  # fmt: skip
            if matter == 0:
                return
        elif ctx is None:
            n_rows = count
        else:
            n_ctx = self.context_count
            n_rows = count + (int(ctx.sum()) if n_ctx is None else n_ctx)
        self.keep_idx = _true_indices(keep.reshape(-1), self.n_keep)
        self.rows_idx = self.keep_idx if ctx is None else _true_indices(rows.reshape(-1), n_rows)
        opts = self.options
        if opts.extra > 0:
            # Drawn over all B*L rows on the CPU generator: the stream advances by
            # the same amount every step whatever the selection, and any device
            # gets the same sample.
            u = torch.rand(self.shape, generator=opts.generator).to(keep.device)
            self.sampled = self._filtered_rows_that_matter(keep, rows) & (u < opts.extra)
            rows = rows | self.sampled
            self.rows_idx = torch.nonzero(rows.reshape(-1)).squeeze(1)
            pos = torch.nonzero(self.sampled.reshape(-1)[self.rows_idx]).squeeze(1)
            self.extra = ExtraRows(pos, opts.weight)

    def _filtered_rows_that_matter(self, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: rows outside the backward set ``rows`` that precede a kept
        row of their document.

        Only those get a gradient in dense training (through the later kept
        row). With none (ρ = 1: only document ends and padding are filtered)
        the dense backward computes the same gradients without gathering, so
        the plan stays dense."""
        return ~rows & precedes(keep, self.layout)

    def rows_for(self, layer_index: int) -> tuple[torch.Tensor | None, ExtraRows | None]:
        """(rows, extra) the backward of decoder layer ``layer_index`` runs on:
        rows [n] sorted flat indices (None: every row, dense), extra the sampled
        filtered rows among them (None: none)."""
        if self.rows_idx is None or layer_index < self.options.exact_layers:
            return None, None
        return self.rows_idx, self.extra

    def kv_mask_for(self, layer_index: int) -> torch.Tensor | None:
        """[B * L] bool on the dense path: the rows whose K/V gradient decoder layer
        ``layer_index`` keeps (kept and context rows; every other row's is zeroed,
        which with the loss on the kept rows gives exactly the compact backward's
        gradients). None: no mask (the compact path, exact mode, or one of the
        bottom exact layers)."""
        if self.kv_mask is None or layer_index < self.options.exact_layers:
            return None
        return self.kv_mask

    def kv_weight(self, keep: torch.Tensor) -> torch.Tensor:
        """[B, L] float64 per-row K/V gradient weights of the compact layers, the
        reference semantics' input: 1 kept or context (in the backward set),
        ``weight`` sampled, 0 elsewhere. keep: the [B, L] bool mask this plan was
        filled with."""
        ctx = self._backward_context()
        w = (keep if ctx is None else keep | ctx).to(torch.float64)
        if self.sampled is not None:
            w = w.masked_fill(self.sampled, self.options.weight)
        return w

    def loss(self, token_loss: torch.Tensor, keep: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Mean of the kept rows' losses, and the plan filled for the backward.

        token_loss: [B, L] float (with grad), keep: [B, L] bool; count: the kept
        rows, if known on the host (:meth:`set_keep`: no host sync then).
        """
        if token_loss.shape != self.shape:
            raise ValueError(
                f"token_loss has shape {tuple(token_loss.shape)}, expected {self.shape}"
            )
        self.set_keep(keep, count)
        # A masked sum, not an index: the gradient of a [B, L] vector costs nothing.
        return (token_loss * keep).sum() / self.n_keep
