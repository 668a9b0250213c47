"""The per-forward plan: which rows the backward pass runs on.

A :class:`Plan` is created when a forward pass starts, captured by every op
of that pass, filled by the selection once the per-token losses exist, and
read by every backward. Until it is filled (or in ``exact`` mode) the
backward is ordinary dense training.

Row ``t`` of a sequence carries the loss for predicting token ``t + 1``; a
row is kept or filtered as a whole (its loss and its K/V go together).
"""

from __future__ import annotations

import functools
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
    exact_top:     the top k decoder layers run the exact (dense) backward; the
                   gradient leaving them downwards is stopped on the rows outside the
                   backward set (when a compact layer lies below), the layers below stay
                   compact. Combines with ``exact_layers`` (together at most every layer).
    kv_projections: in the compact layers, the K/V gradient that filtered rows receive
                   from the backward rows' queries reaches the K/V projections (their
                   weights, biases, LoRA adapters, the k norm and the input norm's weight)
                   but not the residual stream: no gradient enters a filtered row.
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
    backward_ratio: ρ_b in (0, 1], at least the selection's keep ratio ρ (checked where
                   both are known: :meth:`Selector.select`): the valid rows that the
                   selection ranks next after the kept ones, up to ρ_b of them, join the
                   backward set without a loss, as context rows do (their K/V gradient
                   and everything through them flows as under a masked loss). The
                   caller selects them (``Selector.select(..., backward_ratio=)``) and
                   gives them to the plan (:meth:`Plan.set_ranked`). None: only the kept
                   rows (and context rows). ρ_b = 1 is the exact masked-loss gradient.
    """

    def __init__(self, mode: str = "amplified", extra: float = 0.0,
                 extra_weight: float | None = None, exact_layers: int = 0, seed: int = 0,
                 path: str = "auto", context: str = "backward", exact_top: int = 0,
                 kv_projections: bool = False, backward_ratio: float | None = None):  # fmt: skip
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
        for name, k in (("exact_layers", exact_layers), ("exact_top", exact_top)):
            if isinstance(k, bool) or int(k) != k or k < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {k!r}")
        if not isinstance(kv_projections, bool):
            raise ValueError(f"kv_projections must be True or False, got {kv_projections!r}")
        if backward_ratio is not None:
            backward_ratio = float(backward_ratio)
            if not 0.0 < backward_ratio <= 1.0:
                raise ValueError(f"backward_ratio must lie in (0, 1] (and be at least the keep "
                                 f"ratio), got {backward_ratio}")  # fmt: skip
        if mode == "exact" and (extra > 0 or exact_layers > 0 or exact_top > 0 or kv_projections
                                or backward_ratio is not None):  # fmt: skip
            raise ValueError(
                "backward extra / exact_layers / exact_top / kv_projections / backward_ratio "
                "modify the amplified backward; mode 'exact' is already the dense backward"
            )
        self.mode, self.extra, self.exact_layers, self.seed = mode, extra, int(exact_layers), seed
        self.exact_top, self.kv_projections = int(exact_top), kv_projections
        self.path, self.context = path, context
        self.backward_ratio = backward_ratio
        self.weight = (1.0 / extra if extra > 0 else 1.0) if extra_weight is None else extra_weight
        self.generator = torch.Generator().manual_seed(seed)

    def check_layers(self, num_layers: int) -> None:
        if self.exact_layers > num_layers:
            raise ValueError(f"exact_layers={self.exact_layers} exceeds the model's {num_layers} layers")
        if self.exact_top > num_layers:
            raise ValueError(f"exact_top={self.exact_top} exceeds the model's {num_layers} layers")
        if self.exact_layers + self.exact_top > num_layers:
            raise ValueError(
                f"exact_layers={self.exact_layers} and exact_top={self.exact_top} overlap in the "
                f"model's {num_layers} layers: together they may make at most every layer exact"
            )

    def layer_exact(self, layer_index: int, num_layers: int) -> bool:
        """Whether decoder layer ``layer_index`` (of ``num_layers``) runs the exact
        (dense) backward: one of the bottom ``exact_layers`` or the top ``exact_top``."""
        top = self.exact_top > 0 and layer_index >= num_layers - self.exact_top
        return layer_index < self.exact_layers or top

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
        """Amplified options from ``"extra=0.3,extra_weight=1.5,exact_layers=2,exact_top=1,
        kv_projections=1,path=dense,context=constant,backward_ratio=0.7"`` (any subset;
        ``""`` = plain amplified), as the bench's ``--knob`` takes them."""
        kw = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in _PARSERS:
                raise ValueError(
                    f"bad backward option {item!r} in {spec!r}: expected extra=P, extra_weight=W, "
                    "exact_layers=K, exact_top=K, kv_projections=0|1, path=auto|compact|dense, "
                    "context=backward|constant or backward_ratio=R, separated by commas"
                )
            try:
                kw[key] = _PARSERS[key](value)
            except ValueError:
                raise ValueError(f"bad backward option {item!r} in {spec!r}: {value!r} is not "
                                 f"a valid {key}") from None  # fmt: skip
        return cls("amplified", seed=seed, **kw)

    @classmethod
    def of(cls, backward: "str | BackwardOptions") -> "BackwardOptions":
        return backward if isinstance(backward, BackwardOptions) else cls(backward)

    def __repr__(self) -> str:
        return (f"BackwardOptions({self.mode!r}, extra={self.extra:g}, weight={self.weight:g}, "
                f"exact_layers={self.exact_layers}, exact_top={self.exact_top}, "
                f"kv_projections={self.kv_projections}, path={self.path!r}, context={self.context!r}, "
                f"backward_ratio={self.backward_ratio})")  # fmt: skip

    def describe(self) -> str:
        """Short label: ``amplified``, ``amplified+extra0.3``, ``amplified+exact2``,
        ``amplified+backward0.7``, ..."""
        s = self.mode
        if self.extra > 0:
            s += f"+extra{self.extra:g}"
            if not math.isclose(self.weight, 1.0 / self.extra):
                s += f"(w{self.weight:g})"
        if self.exact_layers:
            s += f"+exact{self.exact_layers}"
        if self.exact_top:
            s += f"+exacttop{self.exact_top}"
        if self.kv_projections:
            s += "+kvproj"
        if self.path != "auto":
            s += f"+{self.path}"
        if self.context != "backward":
            s += f"+context-{self.context}"
        if self.backward_ratio is not None:
            s += f"+backward{self.backward_ratio:g}"
        return s


def _flag(value: str) -> bool:
    """``1``/``true``/``yes`` or ``0``/``false``/``no`` (a knob spec's switch)."""
    v = value.strip().lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(value)
    return v in ("1", "true", "yes")


# How BackwardOptions.parse reads each key's value.
_PARSERS = {"extra": float, "extra_weight": float, "exact_layers": int, "exact_top": int,
            "kv_projections": _flag, "path": str, "context": str, "backward_ratio": float}  # fmt: skip


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
class KeyRows:
    """Filtered rows whose K/V gradient reaches the K/V projections only
    (``BackwardOptions.kv_projections``, compact path). The plan takes every row
    outside the backward set: their count is known on the host, so nothing waits
    for the device, and a row that precedes no backward row of its document (a
    document's tail, padding) is seen by no backward query and gets a zero K/V
    gradient, so the gradients are those of the rows that do precede one.

    idx:      [m] sorted flat indices of those rows (any rows outside the
              backward set: the ops take any such subset).
    rows_idx: [n] sorted flat indices of the backward rows (``Plan.rows_idx``).

    The reference backward runs on the union of both (these rows with a zero
    output gradient); the GPU kernels take them as a second key set and never
    build it, so it is made on first use: ``union`` [n + m] sorted flat indices,
    ``rows_pos`` [n] and ``pos`` [m] the positions of each set in it.
    """

    idx: torch.Tensor
    rows_idx: torch.Tensor

    @functools.cached_property
    def union(self) -> torch.Tensor:
        return torch.cat([self.rows_idx, self.idx]).sort().values

    @functools.cached_property
    def rows_pos(self) -> torch.Tensor:
        return torch.searchsorted(self.union, self.rows_idx)

    @functools.cached_property
    def pos(self) -> torch.Tensor:
        return torch.searchsorted(self.union, self.idx)


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

    def padded(self, capacity: int) -> "Layout":
        """This layout with ``cu_seqlens`` padded to ``capacity`` entries by empty
        documents at the end and ``max_seqlen`` set to the row length: the same
        attention, with sizes that depend on the batch's shape and ``capacity``
        alone, so that one captured step (CUDA graphs) serves every batch with at
        most ``capacity - 1`` documents. Kernels skip the empty documents."""
        n = self.cu_seqlens.numel()
        if capacity < n:
            raise ValueError(f"capacity {capacity} below the layout's {n} document bounds")
        B, L = self.shape
        cu = torch.cat([self.cu_seqlens, self.cu_seqlens[-1:].expand(capacity - n)])
        return Layout(self.position_ids, self.segment_ids, cu, L)

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


def _key_rows(rows: torch.Tensor, rows_idx: torch.Tensor) -> KeyRows:
    """:class:`KeyRows` of a backward set ``rows`` ([B, L] bool, flat indices
    ``rows_idx``): every other row. Their count is the rows' minus the backward
    set's, whose size the host knows, so nothing waits for the device."""
    return KeyRows(_true_indices(~rows.reshape(-1), rows.numel() - rows_idx.numel()), rows_idx)


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
    the context rows (:meth:`set_context`), the rows ranked next
    (:meth:`set_ranked`, ``BackwardOptions.backward_ratio``), the sampled filtered rows
    (``BackwardOptions.extra``) and returns no rows (dense) for the bottom
    ``exact_layers`` and the top ``exact_top``. num_layers: the model's decoder
    layers (needed for ``exact_top``).
    """

    def __init__(self, layout: Layout, mode: "str | BackwardOptions" = "amplified",
                 path: str = "compact", num_layers: int | None = None):  # fmt: skip
        self.options = BackwardOptions.of(mode)
        self.layout = layout
        self.mode = self.options.mode
        if num_layers is None and self.options.exact_top > 0:
            raise ValueError("a plan with exact_top needs the model's num_layers")
        if num_layers is not None:
            self.options.check_layers(num_layers)
        self.num_layers = num_layers
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
        self.ranked: torch.Tensor | None = None  # [B, L] bool, rows ranked next (backward_ratio)
        self.ranked_count: int | None = None  # its True entries, when known on the host
        self.kv_mask: torch.Tensor | None = None  # [B * L] bool, the dense path's backward rows
        self.keep_idx: torch.Tensor | None = None
        self.n_keep: int | None = None
        self.sampled: torch.Tensor | None = None  # [B, L] bool, filtered rows drawn into the backward
        self.rows_idx: torch.Tensor | None = None  # sorted flat indices: kept, context, ranked, sampled rows
        self.extra: ExtraRows | None = None
        self.key_rows: KeyRows | None = None  # kv_projections on the compact path
        # Values derived from the filled plan, computed once for all layers (the
        # row split of tensor parallelism, models/tensor_parallel.py).
        self.derived: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def compact(self) -> bool:
        """True when the backward gathers its rows (kept, context, ranked and sampled ones)."""
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

    def set_context(self, context: torch.Tensor | None, count: int | None = None) -> None:
        """Record the context rows ([B, L] bool, :func:`context_rows`): no loss, but
        in the backward set unless ``BackwardOptions.context`` is ``constant``.
        count: their number, when the caller knows it on the host. A CPU mask is
        counted here; for a device mask without ``count`` the compact path learns
        it with one host sync. None: the batch has none (pretraining labels), so
        they are never derived from the labels on the device."""
        if context is None:
            self._context, self.context_count = None, 0
            return
        self.check_keep(context)
        if context.device.type == "cpu":
            count = int(context.sum())  # free on the host
        elif count is not None:
            torch._assert_async(context.sum() == count, "context mask and context count disagree")
        self.context_count = count
        # None at all (pretraining): the mask is never read, so no copy to the device.
        self._context = context if count == 0 else context.to(self.layout.position_ids.device)

    def set_ranked(self, ranked: torch.Tensor, count: int | None = None) -> None:
        """Record the valid rows the selection ranks next after the kept ones
        ([B, L] bool, ``Selector.select(..., backward_ratio=)``): no loss, in the
        backward set as context rows are (``BackwardOptions.backward_ratio``).
        count: their number, known on the host (``Selector.count`` at the backward
        ratio minus the kept count); without it the compact path counts them with
        one host sync."""
        if self.options.backward_ratio is None:
            raise ValueError("ranked rows join the backward set only with "
                             "BackwardOptions(backward_ratio=...)")  # fmt: skip
        self.check_keep(ranked)
        self.ranked, self.ranked_count = ranked, count

    def _rows_without_loss(self) -> tuple[torch.Tensor | None, int | None]:
        """(mask, count) of the rows in the backward set that carry no loss: the
        context rows (unless ``context`` is ``constant``) and the rows ranked next.
        Disjoint (context rows have no target, ranked rows do), so their counts
        add. mask None: none; count None: not known on the host."""
        parts = []
        if self.options.context == "backward" and self.context_count != 0 and self.context is not None:
            parts.append((self.context, self.context_count))
        if self.ranked is not None and self.ranked_count != 0:
            parts.append((self.ranked, self.ranked_count))
        if not parts:
            return None, 0
        mask = parts[0][0] if len(parts) == 1 else parts[0][0] | parts[1][0]
        counts = [n for _, n in parts]
        return mask, None if None in counts else sum(counts)

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
        if self.options.backward_ratio is not None and self.ranked is None:
            raise ValueError("BackwardOptions.backward_ratio needs the rows ranked next: "
                             "Selector.select(..., backward_ratio=) gives them, Plan.set_ranked "
                             "records them")  # fmt: skip
        more, n_more = self._rows_without_loss()
        rows = keep if more is None else keep | more
        if self.path == "dense":  # no row gathered: the layers zero filtered K/V gradients
            self.kv_mask = rows.reshape(-1)
            return
        if count is None:  # one sync learns both whether to gather and how many rows
            matter, n_rows = torch.stack([self._filtered_rows_that_matter(keep, rows).sum(),
                                          rows.sum()]).tolist()  # fmt: skip
            if matter == 0:
                return
        elif more is None:
            n_rows = count
        else:
            n_rows = count + (int(more.sum()) if n_more is None else n_more)
            # Host counts of disjoint sets: a ranked row that is also kept would
            # misplace every index after it.
            torch._assert_async(rows.sum() == n_rows, "kept, context and ranked rows overlap")
        self.keep_idx = _true_indices(keep.reshape(-1), self.n_keep)
        self.rows_idx = self.keep_idx if more is None else _true_indices(rows.reshape(-1), n_rows)
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
        if opts.kv_projections:
            self.key_rows = _key_rows(rows, self.rows_idx)

    def _filtered_rows_that_matter(self, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: rows outside the backward set ``rows`` that precede a kept
        row of their document.

        Only those get a gradient in dense training (through the later kept
        row). With none (ρ = 1: only document ends and padding are filtered)
        the dense backward computes the same gradients without gathering, so
        the plan stays dense."""
        return ~rows & precedes(keep, self.layout)

    def layer_exact(self, layer_index: int) -> bool:
        """Whether decoder layer ``layer_index`` runs the exact backward (a bottom
        ``exact_layers`` or top ``exact_top`` layer)."""
        return self.options.layer_exact(layer_index, self.num_layers)

    def rows_for(self, layer_index: int) -> tuple[torch.Tensor | None, ExtraRows | None]:
        """(rows, extra) the backward of decoder layer ``layer_index`` runs on:
        rows [n] sorted flat indices (None: every row, dense), extra the sampled
        filtered rows among them (None: none)."""
        if self.rows_idx is None or self.layer_exact(layer_index):
            return None, None
        return self.rows_idx, self.extra

    def key_rows_for(self, layer_index: int) -> KeyRows | None:
        """The filtered rows whose K/V gradient decoder layer ``layer_index`` sends
        to its K/V projections only (``kv_projections`` on the compact path);
        None: none."""
        if self.key_rows is None or self.layer_exact(layer_index):
            return None
        return self.key_rows

    def kv_mask_for(self, layer_index: int) -> torch.Tensor | None:
        """[B * L] bool on the dense path: the rows whose K/V gradient decoder layer
        ``layer_index`` keeps (the backward set: kept, context and ranked rows; every
        other row's is zeroed, which with the loss on the kept rows gives exactly the
        compact backward's gradients). None: no mask (the compact path, exact mode, an exact layer,
        or ``kv_projections``, which keeps every K/V gradient and masks the input
        gradient instead: :meth:`dx_mask_for`)."""
        if self.kv_mask is None or self.layer_exact(layer_index) or self.options.kv_projections:
            return None
        return self.kv_mask

    def dx_mask_for(self, layer_index: int) -> torch.Tensor | None:
        """[B * L] bool on the dense path: the rows whose input gradient leaves decoder
        layer ``layer_index`` (every other row's is zeroed). Two layers need one: a
        compact layer under ``kv_projections`` (filtered rows' K/V gradients reach
        the weights, not the residual stream), and the lowest ``exact_top`` layer
        when a compact layer lies below it (the gradient stops at filtered rows).
        On the compact path the layer below reads its own rows only, so no mask is
        needed. None: no mask."""
        if self.kv_mask is None:
            return None
        if self.layer_exact(layer_index):
            return self.kv_mask if self._top_boundary(layer_index) else None
        return self.kv_mask if self.options.kv_projections else None

    def _top_boundary(self, layer_index: int) -> bool:
        """Layer ``layer_index`` is the lowest of the top exact layers and a compact
        layer lies directly below it."""
        top = self.options.exact_top
        return top > 0 and layer_index == self.num_layers - top and layer_index > self.options.exact_layers

    def kv_weight(self, keep: torch.Tensor) -> torch.Tensor:
        """[B, L] float64 per-row K/V gradient weights of the compact layers, the
        reference semantics' input: 1 kept, context or ranked (in the backward
        set), ``weight`` sampled, 0 elsewhere. keep: the [B, L] bool mask this plan
        was filled with."""
        more = self._rows_without_loss()[0]
        w = (keep if more is None else keep | more).to(torch.float64)
        if self.sampled is not None:
            w = w.masked_fill(self.sampled, self.options.weight)
        return w

    def reference_knobs(self, keep: torch.Tensor) -> dict:
        """The knobs of this filled plan as ``reference_filtered_loss`` takes them
        (``centrifuge.models.reference``: the reference semantics)."""
        o = self.options
        return dict(kv_weight=self.kv_weight(keep), exact_layers=o.exact_layers, exact_top=o.exact_top,
                    kv_projections=o.kv_projections)  # fmt: skip

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
