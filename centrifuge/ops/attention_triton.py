"""Triton kernels for the filtered attention backward (and the flash forward).

Semantics are those of :func:`centrifuge.ops.attention.attention_backward_reference`:
with the K/V of filtered rows detached,

* dQ is computed for kept queries only, over every visible key (kernel ``_dq``);
* dK, dV for kept keys only, from kept queries only (kernel ``_dkdv``), so the
  work of that kernel grows with n_keep², not with N · n_keep.

Everything works in *flat token space*: row ``f`` of the ``B * L`` tokens.
Documents are contiguous runs of flat rows (``layout.cu_seqlens``), so the
causal, same-document mask for query row ``i`` and key row ``f`` is simply
``doc_start(i) <= f <= i``. Kept rows are sorted, hence in the *kept index*
space (position in ``keep_idx``) a kept key ``j`` is seen by the kept queries
``j <= i < kept_end(j)``, where ``kept_end(j)`` counts the kept rows before the
end of ``j``'s document. The dQ kernel reads q, k, v, o and lse through
``keep_idx`` (no gathered copies made beforehand) and hands the rows it gathered
(q, lse, and Delta = rowsum(dO * O)) to the dK/dV kernel in compact form, so the
dK/dV inner loop reads contiguous rows; ``do``, ``dq``, ``dk``, ``dv`` are compact
``[n_keep, heads, D]``.

Tiles: a program owns a block of consecutive kept rows (which may straddle a
document boundary; the mask handles it) and walks the other operand in tiles.
Tiles that are fully visible to every row of the block skip the mask; only the
diagonal and document-boundary tiles pay for it. Blocks launch longest-first,
and a KV head's query-head group may be split over programs (float32 atomics
add the slices), which keeps the H100 full when there are few KV heads.
Measurements and tuning: docs/kernels.md, section Attention.

Accumulation is float32; P and dS are rounded to the input dtype before their
matmuls (as flash-attention does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from centrifuge.ops.step_cache import step_cached
from centrifuge.plan import Layout

LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def probs_tile(
    q, lse2, qf, ds_, start, hi, K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok,
    qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The softmax probabilities of a block of kept queries against keys
    [start, start + BLOCK_N) (from the forward's lse), and those keys and values.
    Shared by the dQ kernel and the kept-query forward (attention_recompute_triton)."""
    kf = start + tl.arange(0, BLOCK_N)
    if MASK:
        kmask = (kf < hi)[:, None] & d_ok[None, :]
    else:
        kmask = d_ok[None, :]
    kptr = kf.to(tl.int64)[:, None]
    k = tl.load(K + kptr * stride_kn + k_off + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + kptr * stride_vn + v_off + offs_d[None, :], mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        visible = (kf[None, :] <= qf[:, None]) & (kf[None, :] >= ds_[:, None])
        p = tl.where(visible, p, 0.0)
    return p, k, v


@triton.jit
def _dq_tile(
    acc, q, do, lse2, delta, qf, ds_, start, hi,
    K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok,
    qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    p, k, v = probs_tile(q, lse2, qf, ds_, start, hi, K, V, stride_kn, stride_vn, k_off, v_off,
                         offs_d, d_ok, qk_scale, BLOCK_N, MASK, PREC)  # fmt: skip
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, acc, input_precision=PREC)


@triton.jit
def _dq_kernel(
    Q, K, V, O, DO, LSE, KEEP, DOC_START, ORDER, DQ, DELTA, QK, LSEK,
    n_keep, L, qk_scale, sm_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_on, stride_oh, stride_don, stride_doh,
    stride_lb, stride_lh, stride_lt, stride_dqn, stride_dqh,
    H: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M consecutive kept queries x one query head.
    Also writes, for the dK/dV kernel, the rows it gathered in compact form:
    Delta = rowsum(dO * O), q (QK, [n, H, D]) and lse * log2(e) (LSEK, [n, H]).
    Blocks run in ORDER (most keys first) so the long ones do not form the tail."""
    pid_m = tl.load(ORDER + tl.program_id(0))
    h = tl.program_id(1)
    first = pid_m * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < n_keep
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # Padding rows of the last block: flat index -1 sees no key, lse = +inf gives p = 0.
    qf = tl.load(KEEP + rows, mask=row_ok, other=-1).to(tl.int64)
    ds_ = tl.load(DOC_START + rows, mask=row_ok, other=0).to(tl.int64)
    last = tl.minimum(first + BLOCK_M, n_keep) - 1
    lo = tl.load(DOC_START + first).to(tl.int64)  # earliest key any row may see
    hi = tl.load(KEEP + last).to(tl.int64) + 1  # one past the latest
    max_ds = tl.load(DOC_START + last).to(tl.int64)
    min_q = tl.load(KEEP + first).to(tl.int64)

    m2 = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + qf[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=m2, other=0.0)
    o = tl.load(O + qf[:, None] * stride_on + h * stride_oh + offs_d[None, :], mask=m2, other=0.0)
    do = tl.load(
        DO + rows.to(tl.int64)[:, None] * stride_don + h * stride_doh + offs_d[None, :],
        mask=m2, other=0.0,
    )  # fmt: skip
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + rows.to(tl.int64) * H + h, delta, mask=row_ok)
    b = qf // L
    lse = tl.load(
        LSE + b * stride_lb + h * stride_lh + (qf - b * L) * stride_lt, mask=row_ok,
        other=float("inf"),
    )  # fmt: skip
    lse2 = lse * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    r64 = rows.to(tl.int64)
    tl.store(QK + r64[:, None] * (H * D) + h * D + offs_d[None, :], q, mask=m2)
    tl.store(LSEK + r64 * H + h, lse2, mask=row_ok)

    k_off = (h // GROUPS).to(tl.int64) * stride_kh
    v_off = (h // GROUPS).to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key tiles start at lo. Tiles in [lo, max_ds) may belong to another document
    # for some rows, tiles past min_q cross some row's diagonal: both masked.
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    full_lo = tl.minimum(tl.cdiv(max_ds - lo, BLOCK_N), n_tiles)
    full_hi = tl.maximum(full_lo, tl.minimum((min_q + 1 - lo) // BLOCK_N, n_tiles))
    for t in range(0, full_lo):
        acc = _dq_tile(acc, q, do, lse2, delta, qf, ds_, lo + t * BLOCK_N, hi,
                       K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok, qk_scale,
                       BLOCK_N, True, PREC)  # fmt: skip
    for t in range(full_lo, full_hi):
        acc = _dq_tile(acc, q, do, lse2, delta, qf, ds_, lo + t * BLOCK_N, hi,
                       K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok, qk_scale,
                       BLOCK_N, False, PREC)  # fmt: skip
    for t in range(full_hi, n_tiles):
        acc = _dq_tile(acc, q, do, lse2, delta, qf, ds_, lo + t * BLOCK_N, hi,
                       K, V, stride_kn, stride_vn, k_off, v_off, offs_d, d_ok, qk_scale,
                       BLOCK_N, True, PREC)  # fmt: skip
    acc = acc * sm_scale
    tl.store(
        DQ + rows.to(tl.int64)[:, None] * stride_dqn + h * stride_dqh + offs_d[None, :],
        acc.to(DQ.dtype.element_ty), mask=m2,
    )  # fmt: skip


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, qfirst, kend, start, q_hi,
    QK, DO, LSEK, DELTA, h, stride_don, stride_doh, offs_d, d_ok, qk_scale,
    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # Queries come compact (QK, LSEK written by the dQ kernel): no gather here.
    rows = start + tl.arange(0, BLOCK_M)
    r64 = rows.to(tl.int64)
    if MASK:
        row_ok = rows < q_hi
        m2 = row_ok[:, None] & d_ok[None, :]
    else:
        m2 = d_ok[None, :]
    q = tl.load(QK + r64[:, None] * (H * D) + h * D + offs_d[None, :], mask=m2, other=0.0)
    do = tl.load(DO + r64[:, None] * stride_don + h * stride_doh + offs_d[None, :], mask=m2, other=0.0)
    if MASK:
        lse2 = tl.load(LSEK + r64 * H + h, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + r64 * H + h, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(LSEK + r64 * H + h)
        delta = tl.load(DELTA + r64 * H + h)
    # Transposed tile [keys, queries], so dK/dV accumulate without transposes.
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
    if MASK:
        visible = (rows[None, :] >= qfirst[:, None]) & (rows[None, :] < kend[:, None])
        p_t = tl.where(visible, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    QK, K, V, DO, LSEK, DELTA, KEYS, QFIRST, KEY_END, ORDER, DK, DV,
    n_keys, qk_scale, sm_scale,
    stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dks, stride_dkn, stride_dkh, stride_dvs, stride_dvn, stride_dvh,
    H: tl.constexpr, GROUPS: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
    KEYS_KEPT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N consecutive keys x one KV head x one of SPLIT slices
    of its query-head group; loops over those heads and over the kept queries
    that see the keys. Keys: KEYS [n_keys] sorted flat rows; key c is seen by
    the kept queries QFIRST[c] <= i < KEY_END[c] (kept index space). KEYS_KEPT:
    the keys are the kept rows themselves (QFIRST[c] = c, not read). With
    SPLIT > 1 (more programs in flight when there are few KV heads) each slice
    either adds its float32 sum atomically into DK, DV ([n, Hkv, D] float32,
    zeroed; ATOMIC) or writes it to its own slice of DK, DV ([SPLIT, n, Hkv, D]
    float32) for the wrapper to add up."""
    pid_n = tl.load(ORDER + tl.program_id(0))
    hk = tl.program_id(1) // SPLIT
    part = tl.program_id(1) % SPLIT
    first = pid_n * BLOCK_N
    cols = first + tl.arange(0, BLOCK_N)
    col_ok = cols < n_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m2 = col_ok[:, None] & d_ok[None, :]
    kf = tl.load(KEYS + cols, mask=col_ok, other=0).to(tl.int64)
    kend = tl.load(KEY_END + cols, mask=col_ok, other=0)
    k = tl.load(K + kf[:, None] * stride_kn + hk * stride_kh + offs_d[None, :], mask=m2, other=0.0)
    v = tl.load(V + kf[:, None] * stride_vn + hk * stride_vh + offs_d[None, :], mask=m2, other=0.0)
    last = tl.minimum(first + BLOCK_N, n_keys) - 1
    if KEYS_KEPT:  # a kept key is its own first query (the diagonal)
        qfirst = cols
        q_lo = first
        q_last = last
    else:  # sorted keys: their first queries are sorted too
        qfirst = tl.load(QFIRST + cols, mask=col_ok, other=0)
        q_lo = tl.load(QFIRST + first)
        q_last = tl.load(QFIRST + last)
    q_hi = tl.load(KEY_END + last)  # one past the last kept query any key here is seen by
    kend_min = tl.load(KEY_END + first)
    # Query tiles start at q_lo. Masked: tiles that start before the block's last
    # key's first query, and tiles that reach past the first key's document.
    n_tiles = tl.cdiv(q_hi - q_lo, BLOCK_M)
    full_lo = tl.minimum(tl.cdiv(q_last - q_lo, BLOCK_M), n_tiles)
    full_hi = tl.maximum(full_lo, tl.minimum((kend_min - q_lo) // BLOCK_M, n_tiles))
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS // SPLIT):
        h = hk * GROUPS + part * (GROUPS // SPLIT) + g
        for t in range(0, full_lo):
            dk, dv = _dkdv_tile(dk, dv, k, v, qfirst, kend, q_lo + t * BLOCK_M, q_hi,
                                QK, DO, LSEK, DELTA, h, stride_don, stride_doh, offs_d, d_ok,
                                qk_scale, H, D, BLOCK_M, True, PREC)  # fmt: skip
        for t in range(full_lo, full_hi):
            dk, dv = _dkdv_tile(dk, dv, k, v, qfirst, kend, q_lo + t * BLOCK_M, q_hi,
                                QK, DO, LSEK, DELTA, h, stride_don, stride_doh, offs_d, d_ok,
                                qk_scale, H, D, BLOCK_M, False, PREC)  # fmt: skip
        for t in range(full_hi, n_tiles):
            dk, dv = _dkdv_tile(dk, dv, k, v, qfirst, kend, q_lo + t * BLOCK_M, q_hi,
                                QK, DO, LSEK, DELTA, h, stride_don, stride_doh, offs_d, d_ok,
                                qk_scale, H, D, BLOCK_M, True, PREC)  # fmt: skip
    c64 = cols.to(tl.int64)[:, None]
    dk_ptr = DK + part * stride_dks + c64 * stride_dkn + hk * stride_dkh + offs_d[None, :]
    dv_ptr = DV + part * stride_dvs + c64 * stride_dvn + hk * stride_dvh + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptr, dk * sm_scale, mask=m2, sem="relaxed")
        tl.atomic_add(dv_ptr, dv, mask=m2, sem="relaxed")
    else:
        tl.store(dk_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=m2)
        tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- #
# Launch wrappers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shapes and launch parameters of the two backward kernels.
    dq_*: query block x key tile of the dQ kernel; kv_*: query tile x key block
    of the dK/dV kernel; kv_split: slices of a KV head's query-head group run as
    separate programs (0 = choose from the grid size), their sums combined by
    float32 atomics (kv_atomic) or by a sum over per-slice buffers."""

    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    kv_block_m: int = 32
    kv_block_n: int = 128
    kv_warps: int = 4
    kv_stages: int = 2
    kv_split: int = 0
    kv_atomic: bool = True


def default_config(head_dim: int, dtype: torch.dtype) -> BackwardConfig:
    """Measured choices per head dim (docs/kernels.md, section Attention)."""
    if head_dim <= 64:
        return BackwardConfig(64, 64, 4, 2, 32, 128, 4, 2)
    return BackwardConfig(64, 64, 4, 2, 32, 64, 4, 2)


def _split_for(groups: int, programs: int, target: int = 4096) -> int:
    """Largest power-of-two slice count dividing ``groups`` that is still needed
    to bring the dK/dV grid near ``target`` programs (several waves on 132 SMs)."""
    split = 1
    while groups % (2 * split) == 0 and programs * split < target:
        split *= 2
    return split


@dataclass
class KeptRowBounds:
    """Per kept row (sorted flat indices ``keep_idx``):
    doc_start [n] int32: first flat row of its document (earliest key it sees);
    kept_end  [n] int32: number of kept rows before the end of its document
    (its key is seen by kept queries ``j <= i < kept_end``).
    ``orders`` caches per block size the launch order of the blocks."""

    doc_start: torch.Tensor
    kept_end: torch.Tensor
    orders: dict = field(default_factory=dict)


def kept_row_bounds(keep_idx: torch.Tensor, cu_seqlens: torch.Tensor) -> KeptRowBounds:
    """keep_idx: [n] sorted flat row indices; cu_seqlens: [n_docs + 1] document bounds."""
    cu = cu_seqlens.to(device=keep_idx.device, dtype=keep_idx.dtype)
    doc = torch.searchsorted(cu, keep_idx, right=True) - 1
    doc_start = cu[doc]
    kept_end = torch.searchsorted(keep_idx, cu[doc + 1])
    return KeptRowBounds(doc_start.to(torch.int32), kept_end.to(torch.int32))


def block_order(keep_idx: torch.Tensor, bounds: KeptRowBounds, kind: str, block: int) -> torch.Tensor:
    """[n_blocks] int32: the blocks of ``block`` consecutive kept rows, most work
    first (longest-first scheduling: the causal triangle makes early blocks of a
    document the long dK/dV programs and late ones the long dQ programs).
    kind "dq": work = keys from the block's first document start to its last query;
    kind "kv": work = kept queries from the block's first key to its last key's document end."""
    key = (kind, block)
    if key not in bounds.orders:
        firsts, lasts = _blocks(keep_idx, block)
        if kind == "dq":
            work = keep_idx[lasts] + 1 - bounds.doc_start[firsts].long()
        else:
            work = bounds.kept_end[lasts].long() - firsts
        bounds.orders[key] = _longest_first(work)
    return bounds.orders[key]


def _blocks(rows: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last positions (int64) of each run of ``block`` consecutive
    entries of ``rows`` ([n])."""
    firsts = torch.arange(0, rows.numel(), block, device=rows.device)
    return firsts, (firsts + block - 1).clamp(max=rows.numel() - 1)


def _longest_first(work: torch.Tensor) -> torch.Tensor:
    """[n_blocks] int32: block indices by decreasing ``work``, ties in block order."""
    return torch.argsort(work, descending=True, stable=True).to(torch.int32)


def _all_rows(n: int, device) -> torch.Tensor:
    """One arange per size and device, so the bounds cache also serves dense calls."""
    key = (n, str(device))
    if key not in _all_rows_cache:
        _all_rows_cache[key] = torch.arange(n, device=device)
    return _all_rows_cache[key]


_all_rows_cache: dict = {}


def _cached_bounds(keep_idx: torch.Tensor, cu_seqlens: torch.Tensor) -> KeptRowBounds:
    """Every decoder layer of a step calls the backward with the same keep_idx and
    layout: their bounds are built once per step."""
    return step_cached("kept", kept_row_bounds, keep_idx, cu_seqlens)


def _check_inputs(q, k, v, o, lse, do, layout: Layout, keep_idx):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, L, H, D], got shape {tuple(q.shape)}")
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, L, Hkv, D) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [B, L, Hkv, D] = {(B, L, Hkv, D)}, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if o.shape != q.shape:
        raise ValueError(f"o must have q's shape {tuple(q.shape)}, got {tuple(o.shape)}")
    if lse.shape != (B, H, L) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [B, H, L] = {(B, H, L)}, got {lse.dtype} {tuple(lse.shape)}")
    if not (q.dtype == k.dtype == v.dtype == o.dtype == do.dtype):
        raise TypeError(f"q, k, v, o, do must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {o.dtype}, {do.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}: use float16, bfloat16 or float32")
    n = B * L if keep_idx is None else keep_idx.numel()
    if do.shape != (n, H, D):
        raise ValueError(f"do must be [n_keep, H, D] = {(n, H, D)}, got {tuple(do.shape)}")
    if layout.shape != (B, L):
        raise ValueError(f"layout is for shape {layout.shape}, attention inputs are {(B, L)}")
    if keep_idx is not None and keep_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"keep_idx must be an integer index tensor, got {keep_idx.dtype}")


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """[B, L, h, D] -> [B*L, h, D] with unit stride on D (a view when possible)."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class KeyRowBounds:
    """Per filtered key row (sorted flat indices ``key_idx``, none kept), in the
    kept index space of ``keep_idx``:
    qfirst  [m] int32: the first kept query that sees it (kept rows before it);
    key_end [m] int32: kept rows before the end of its document (it is seen by
    kept queries ``qfirst <= i < key_end``: none when equal, as for a
    document's tail after its last kept row, padding, or a document without
    kept rows). ``orders`` caches per block size the launch order of the blocks."""

    qfirst: torch.Tensor
    key_end: torch.Tensor
    orders: dict = field(default_factory=dict)

    def order(self, block: int) -> torch.Tensor:
        """[n_blocks] int32: the blocks of ``block`` consecutive keys, most kept
        queries first (as :func:`block_order`)."""
        if block not in self.orders:
            firsts, lasts = _blocks(self.qfirst, block)
            self.orders[block] = _longest_first(self.key_end[lasts].long() - self.qfirst[firsts].long())
        return self.orders[block]


def key_row_bounds(key_idx: torch.Tensor, keep_idx: torch.Tensor, cu_seqlens: torch.Tensor) -> KeyRowBounds:
    """key_idx: [m] sorted flat indices of filtered rows; keep_idx: [n] sorted kept
    rows; cu_seqlens: [n_docs + 1] document bounds."""
    cu = cu_seqlens.to(device=key_idx.device, dtype=key_idx.dtype)
    doc = torch.searchsorted(cu, key_idx, right=True) - 1
    first = torch.searchsorted(keep_idx, key_idx)
    end = torch.searchsorted(keep_idx, cu[doc + 1])
    return KeyRowBounds(first.to(torch.int32), end.to(torch.int32))


def attention_backward_triton(
    q, k, v, o, lse, do, layout: Layout, keep_idx: torch.Tensor | None,
    scale: float | None = None, config: BackwardConfig | None = None,
    key_idx: torch.Tensor | None = None,
):  # fmt: skip
    """Filtered attention backward with the Triton kernels (same contract as
    ``attention_backward_reference``).

    q, o: [B, L, H, D]; k, v: [B, L, Hkv, D] (fp16, bf16 or fp32);
    lse: [B, H, L] float32, any strides; do: [n, H, D] for the kept rows
    ``keep_idx`` ([n] sorted flat indices into B*L; None = every row).
    Returns dq [n, H, D], dk [n, Hkv, D], dv [n, Hkv, D] in the input dtype.
    key_idx: [m] sorted flat indices of filtered rows (``kv_projections``' key
    rows) whose K/V gradient from the kept queries is wanted too: then also
    returns their dk, dv [m, Hkv, D] (one more dK/dV launch over the kept
    queries' compact rows; the filtered rows' queries are never read).
    """
    _check_inputs(q, k, v, o, lse, do, layout, keep_idx)
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    N = B * L
    scale = D**-0.5 if scale is None else scale
    if keep_idx is None:
        keep_idx = _all_rows(N, q.device)
    n = keep_idx.numel()
    m = 0 if key_idx is None else key_idx.numel()
    dq = torch.empty(n, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(n, Hkv, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(n, Hkv, D, device=q.device, dtype=v.dtype)
    key_grads = () if key_idx is None else (torch.empty(m, Hkv, D, device=q.device, dtype=k.dtype),
                                            torch.empty(m, Hkv, D, device=q.device, dtype=v.dtype))  # fmt: skip
    if n == 0:  # no kept query: the key rows get no gradient
        return (dq, dk, dv, *(g.zero_() for g in key_grads))
    cfg = config or default_config(D, q.dtype)
    bounds = _cached_bounds(keep_idx, layout.cu_seqlens)
    q3, k3, v3, o3 = _rows_view(q), _rows_view(k), _rows_view(v), _rows_view(o)
    do = do if do.stride(-1) == 1 else do.contiguous()
    # Written by the dQ kernel for the dK/dV kernel: the kept rows' Delta, q and
    # lse * log2(e), compact, so the dK/dV inner loop reads contiguous rows.
    delta = torch.empty(n, H, device=q.device, dtype=torch.float32)
    q_kept = torch.empty(n, H, D, device=q.device, dtype=q.dtype)
    lse_kept = torch.empty(n, H, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * LOG2E
    groups = H // Hkv
    order = block_order(keep_idx, bounds, "dq", cfg.dq_block_m)
    _dq_kernel[(order.numel(), H)](
        q3, k3, v3, o3, do, lse, keep_idx, bounds.doc_start, order, dq, delta, q_kept, lse_kept,
        n, L, qk_scale, scale,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        o3.stride(0), o3.stride(1), do.stride(0), do.stride(1),
        lse.stride(0), lse.stride(1), lse.stride(2), dq.stride(0), dq.stride(1),
        H=H, GROUPS=groups, D=D, BLOCK_D=block_d,
        BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, PREC=prec,
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )  # fmt: skip

    def dkdv(keys, qfirst, key_end, order, dk, dv):
        """One dK/dV launch over ``keys`` (qfirst None: the kept rows themselves)."""
        n_keys = keys.numel()
        split = cfg.kv_split or _split_for(groups, order.numel() * Hkv)
        if groups % split:
            raise ValueError(f"kv_split={split} must divide the query heads per KV head ({groups})")
        atomic = split > 1 and cfg.kv_atomic
        if split == 1:
            dk_out, dv_out = dk, dv
            strides = (0, dk.stride(0), dk.stride(1), 0, dv.stride(0), dv.stride(1))
        elif atomic:
            f32 = dk.dtype == torch.float32
            dk_out = dk.zero_() if f32 else torch.zeros(n_keys, Hkv, D, device=q.device, dtype=torch.float32)
            dv_out = dv.zero_() if f32 else torch.zeros(n_keys, Hkv, D, device=q.device, dtype=torch.float32)
            strides = (0, dk_out.stride(0), dk_out.stride(1), 0, dv_out.stride(0), dv_out.stride(1))
        else:
            dk_out = torch.empty(split, n_keys, Hkv, D, device=q.device, dtype=torch.float32)
            dv_out = torch.empty_like(dk_out)
            strides = dk_out.stride()[:3] + dv_out.stride()[:3]
        _dkdv_kernel[(order.numel(), Hkv * split)](
            q_kept, k3, v3, do, lse_kept, delta, keys, keys if qfirst is None else qfirst, key_end,
            order, dk_out, dv_out, n_keys, qk_scale, scale,
            k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1), do.stride(0), do.stride(1),
            *strides,
            H=H, GROUPS=groups, SPLIT=split, ATOMIC=atomic, KEYS_KEPT=qfirst is None, D=D,
            BLOCK_D=block_d, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n, PREC=prec,
            num_warps=cfg.kv_warps, num_stages=cfg.kv_stages,
        )  # fmt: skip
        if split > 1 and dk_out is not dk:
            dk.copy_(dk_out if atomic else dk_out.sum(0))
            dv.copy_(dv_out if atomic else dv_out.sum(0))

    dkdv(keep_idx, None, bounds.kept_end, block_order(keep_idx, bounds, "kv", cfg.kv_block_n), dk, dv)
    if m:
        kb = step_cached("keys", key_row_bounds, key_idx, keep_idx, layout.cu_seqlens)
        dkdv(key_idx, kb.qfirst, kb.key_end, kb.order(cfg.kv_block_n), *key_grads)
    return (dq, dk, dv, *key_grads)


# --------------------------------------------------------------------------- #
# PyTorch's flash-attention kernels (CUDA, fp16/bf16): forward, dense backward
# --------------------------------------------------------------------------- #


def flash_supported(q: torch.Tensor) -> bool:
    D = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256


def _lse_to_bhl(lse: torch.Tensor, layout: Layout, H: int) -> torch.Tensor:
    """Flash's varlen logsumexp -> [B, H, L]. Recent kernels return [H, total]
    (a free view); older ones [n_docs, H, max_seqlen], padded per document."""
    B, L = layout.shape
    if lse.shape == (H, B * L):
        return lse.view(H, B, L).permute(1, 0, 2)
    n_docs = layout.cu_seqlens.numel() - 1
    if lse.dim() == 3 and lse.shape[0] == n_docs and lse.shape[1] == H:
        cu = layout.cu_seqlens.long()
        flat = torch.arange(B * L, device=lse.device)
        doc = torch.searchsorted(cu, flat, right=True) - 1
        src = doc * lse.shape[2] + (flat - cu[doc])
        lse_hn = lse.permute(1, 0, 2).reshape(H, -1)[:, src]
        return lse_hn.view(H, B, L).permute(1, 0, 2)
    raise RuntimeError(f"unexpected logsumexp shape {tuple(lse.shape)} from the flash forward")


def attention_forward_flash(q, k, v, layout: Layout, scale: float | None = None):
    """Causal varlen flash forward over the flat tokens (documents = cu_seqlens).
    Returns (o [B, L, H, D], lse [B, H, L] float32, possibly a strided view)."""
    B, L, H, D = q.shape
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        _rows_view(q), _rows_view(k), _rows_view(v), cu, cu,
        layout.max_seqlen, layout.max_seqlen, 0.0, True, False, scale=scale,
    )  # fmt: skip
    return out.view(B, L, H, D), _lse_to_bhl(lse, layout, H)


# --------------------------------------------------------------------------- #
# cuDNN's fused attention forward (CUDA, fp16/bf16), for batches whose rows are
# one whole document each (no packing, no padding): [B, H, L, D] views, causal.
# --------------------------------------------------------------------------- #

# GQA: cuDNN takes Hkv < H heads natively; set True to hand it k/v expanded to
# H heads instead (a copy per layer), e.g. on a cuDNN that rejects GQA.
CUDNN_EXPAND_KV = False


# Set to the error once cuDNN refused a call (an older cuDNN or GPU): every later
# call takes the flash forward instead of failing again.
_cudnn_failure: list = [None]


def cudnn_forward_possible(q: torch.Tensor, layout: Layout) -> bool:
    """One document per row (cu_seqlens has B + 1 entries): a plain causal batch,
    on a GPU and cuDNN that run its fused attention (sm80+, not failed before)."""
    B = q.shape[0]
    return (
        _cudnn_failure[0] is None
        and flash_supported(q)
        and layout.cu_seqlens.numel() == B + 1
        and q.shape[-1] <= 128
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def note_cudnn_failure(err: Exception) -> None:
    import warnings

    _cudnn_failure[0] = err
    warnings.warn(f"cuDNN attention failed ({err}); using the flash forward from now on", stacklevel=3)


def _cudnn_lse_to_bhl(lse: torch.Tensor, B: int, H: int, L: int) -> torch.Tensor:
    """cuDNN's softmax statistics -> [B, H, L] float32 (a view where possible)."""
    if lse.shape == (B, H, L, 1):
        lse = lse[..., 0]
    if lse.shape != (B, H, L):
        raise RuntimeError(f"unexpected logsumexp shape {tuple(lse.shape)} from the cuDNN forward")
    return lse if lse.dtype == torch.float32 else lse.float()


def attention_forward_cudnn(q, k, v, layout: Layout, scale: float | None = None):
    """Causal attention of [B, L, H, D] q (k, v: [B, L, Hkv, D]), one document per
    row, with cuDNN's fused kernel. Inputs may be column views of a wider buffer
    (unit stride in D). Returns (o [B, L, H, D], lse [B, H, L] float32, natural log,
    the convention of the flash forward and of the Triton backward)."""
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    if CUDNN_EXPAND_KV and Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, False,
        scale=scale,
    )  # fmt: skip
    o = out.transpose(1, 2)
    # The layer's output GEMM wants [B*L, H*D] rows: copy only if cuDNN chose another layout.
    o = o if o.is_contiguous() else o.contiguous()
    return o, _cudnn_lse_to_bhl(lse, B, H, L)


def flash_dense_backward_possible(lse: torch.Tensor, layout: Layout) -> bool:
    """The dense flash backward needs the [H, total] logsumexp the forward made."""
    B, L = layout.shape
    return lse.dim() == 3 and lse.stride(0) == L and lse.stride(2) == 1 and lse.stride(1) == B * L


def attention_backward_flash_dense(q, k, v, o, lse, do, layout: Layout, scale: float | None = None):
    """Dense (every row) causal varlen backward with PyTorch's flash kernel.
    do: [B*L, H, D]. Returns dq [B*L, H, D], dk, dv [B*L, Hkv, D]."""
    B, L, H, D = q.shape
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    lse_hn = lse.permute(1, 0, 2).reshape(H, B * L)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        do.contiguous(), _rows_view(q), _rows_view(k), _rows_view(v), _rows_view(o), lse_hn,
        cu, cu, layout.max_seqlen, layout.max_seqlen, 0.0, True, rng, unused, scale=scale,
    )  # fmt: skip


def attention_backward_flash_gather(
    q, k, v, o, lse, do, layout: Layout, keep_idx: torch.Tensor, scale: float | None = None
):  # fmt: skip
    """The filtered backward through flash's dense backward: scatter dO of the kept
    rows into zeros, run the dense backward, keep the kept rows. Exact for the
    filtered semantics: a query with dO = 0 has dS = 0, so filtered queries add
    nothing to any dK/dV, and gradients of filtered rows (the only ones the
    detached K/V change) are dropped. Costs a full dense backward, so it only
    pays where the filtered kernels do not (ratios near 1); also a cross-check."""
    B, L, H, D = q.shape
    do_full = do.new_zeros(B * L, H, D).index_copy_(0, keep_idx, do)
    dq, dk, dv = attention_backward_flash_dense(q, k, v, o, lse, do_full, layout, scale)
    return dq[keep_idx], dk[keep_idx], dv[keep_idx]
