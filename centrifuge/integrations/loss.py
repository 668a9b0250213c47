"""The one line on the user's side: a filtered loss that also fills the plan.

Where a token-filtering loop today ends with a masked mean::

    loss = (token_loss * keep).sum() / keep.sum()

it calls::

    loss = centrifuge.filtered_loss(token_loss, keep)

with the same inputs and gets the same value; on a patched model
(:func:`centrifuge.patch`) the backward then runs on the kept rows only.
:func:`selective_loss` does the selection too (``rho1`` with reference logits or
losses, ``loss``, ``random``), from logits and HF-style unshifted labels, or from
the per-token losses of a patched model called with ``labels=`` (no logits).

Rows: row ``t`` of a forward predicts token ``t + 1``. Per-token losses are
accepted as ``[B, L]`` (one per row), ``[B, L - 1]`` (from ``logits[:, :-1]``,
the usual shift) or either flattened.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from centrifuge.integrations.hf import HFPlan, find_plan, shift_labels, valid_rows
from centrifuge.ops.linear_ce import IGNORE_INDEX
from centrifuge.plan import Plan
from centrifuge.selection import Selector

_CHUNK_ELEMENTS = 2**24  # logits elements per chunk of the selection's no-grad loss


def _rows(x: torch.Tensor, shape: tuple[int, int], what: str) -> torch.Tensor:
    """Map per-token values onto the plan's [B, L] rows (shifted forms end with a
    row that has no value: filled with False / 0)."""
    B, L = shape
    n = x.numel()
    if n == B * L:
        return x.reshape(B, L)
    if n == B * (L - 1):
        pad = x.new_zeros(B, 1)
        return torch.cat([x.reshape(B, L - 1), pad], dim=1)
    raise ValueError(
        f"{what} has {n} entries ({tuple(x.shape)}), which matches neither the forward's "
        f"{B}x{L} rows nor its {B}x{L - 1} shifted rows (logits[:, :-1])"
    )


def _as_mask(mask: torch.Tensor, like: torch.Tensor, what: str = "keep mask") -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, token losses {tuple(like.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what} must be bool or hold only 0 and 1 (weighted losses are not supported)")
    return mask.bool()


def _fill(plan: Plan, keep_rows: torch.Tensor, count: int | None = None,
          has_target: torch.Tensor | None = None) -> None:  # fmt: skip
    """Fill the plan with the kept rows ([B, L] bool); ``has_target`` ([B, L] bool,
    the rows with a target) gives it its context rows unless its forward did."""
    if _needs_targets(plan):
        plan.valid = has_target
    if isinstance(plan, HFPlan):
        plan.fill(keep_rows, count)
    else:
        plan.set_keep(keep_rows, count)


def _plan_of(t: torch.Tensor, plan: Plan | None) -> Plan | None:
    if plan is not None or not (torch.is_grad_enabled() and t.requires_grad):
        return plan
    found = find_plan(t)
    if found is None:
        warnings.warn(
            "centrifuge: these losses do not come from a patched model's training forward "
            "(centrifuge.patch(model)); computing an ordinary masked mean with a dense backward",
            stacklevel=3,
        )
    return found


def _needs_targets(plan: Plan) -> bool:
    """The plan does not know its context rows: its forward had no labels."""
    return plan.valid is None and plan.context is None


def filtered_loss(
    token_loss: torch.Tensor,
    keep: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    plan: Plan | None = None,
    count: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the kept per-token losses, with the compact backward.

    token_loss: per-token losses with grad, [B, L], [B, L-1] or flattened (any float dtype).
    keep: same shape, bool (or 0/1): the rows that count.
    valid: same shape, bool: the rows that have a target (e.g. ``labels[:, 1:] != -100``).
        Rows without one that precede a labelled row (a prompt) are context rows:
        no loss, but in the backward set (``BackwardOptions.context``). When
        omitted, a row that is not kept and whose loss is exactly 0 (what
        ``cross_entropy`` gives an ``ignore_index`` label) counts as having none;
        a patched forward called with ``labels=`` knows them already.
    num_items: the denominator, when it is not ``keep.sum()`` (e.g. the kept count
        of a whole gradient-accumulation window).
    plan: the forward's plan; found from the autograd graph when omitted.
    count: ``keep.sum()`` when the caller knows it on the host beforehand (e.g.
        ``Selector.count`` of the valid rows, from the CPU batch): nothing between
        this call and the backward then waits for the device, and the checks
        (padding kept, gradient reaching filtered rows, the count itself) become
        asynchronous device asserts.
    Returns ``(token_loss * keep).sum() / keep.sum()`` (or ``/ num_items``).
    """
    keep = _as_mask(keep, token_loss)
    denominator = keep.sum() if num_items is None else num_items
    loss = (token_loss * keep).sum() / denominator
    plan = _plan_of(token_loss, plan)
    if plan is not None:
        keep_rows = _rows(keep, plan.shape, "the keep mask").bool()
        has_target = None  # a forward with labels= already gave the plan its context rows
        if _needs_targets(plan) and valid is not None:
            has_target = _rows(_as_mask(valid, token_loss, "valid mask"), plan.shape, "the valid mask").bool()
        elif _needs_targets(plan):
            has_target = keep_rows | (_rows(token_loss.detach(), plan.shape, "token_loss") != 0)
        _fill(plan, keep_rows, count, has_target)
    return loss


@torch.no_grad()
def token_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Per-row cross-entropy without grad, in float32 chunks (no [N, V] float32 copy).

    logits: [B, L, V], targets: [B, L] (already shifted) -> [B, L] float32 (0 where ignored).
    """
    V = logits.shape[-1]
    flat, t = logits.reshape(-1, V), targets.reshape(-1)
    out = torch.empty(t.shape, device=logits.device, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // V)
    for s in range(0, t.numel(), step):
        out[s : s + step] = F.cross_entropy(
            flat[s : s + step].float(), t[s : s + step], ignore_index=ignore_index, reduction="none"
        )
    return out.view(targets.shape)


def selective_loss(
    logits,
    labels: torch.Tensor,
    selector: Selector | str = "loss",
    ratio: float = 0.5,
    *,
    reference_logits: torch.Tensor | None = None,
    reference_loss: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
    plan: Plan | None = None,
    return_keep: bool = False,
    count: int | None = None,
    generator: torch.Generator | None = None,
):
    """Token-filtered LM loss: select, then average over the kept rows.

    logits: [B, L, V] (a patched model's output), or the whole output of a patched
        model called with ``labels=`` (:class:`CausalLMTokenLossOutput`, no logits:
        its ``token_loss`` and ``valid`` are used).
    labels: [B, L] unshifted, ``ignore_index`` where no loss is wanted (HF convention);
        ignored rows before a labelled one (a prompt) are context rows
        (:func:`filtered_loss`).
    selector: a :class:`Selector`, or a method name (``rho1``, ``loss``,
        ``random``, ``none``) used with ``ratio`` (batch granularity).
    generator: with a method name, where ``random`` draws (a new draw every
        call); by default torch's default generator, so ``torch.manual_seed``
        fixes the sequence of selections. A :class:`Selector` brings its own
        (its ``seed``).
    reference_logits ([B, L, V]) or reference_loss ([B, L] / [B, L-1] per-token
        reference losses): what ``rho1`` subtracts.
    attention_mask / position_ids: as given to the model (padding rows and the
        last row of every packed document are never kept); a fused output brings
        its own ``valid`` rows instead.
    num_items: the denominator when it is not the kept count (accumulation windows).
    count: ``selector.count(valid)`` computed beforehand on the host (from the CPU
        labels): a selection that filters then runs without host syncs up to the
        backward (:func:`filtered_loss`); ignored when every valid row is kept.
    Returns the loss (and the [B, L] keep mask with ``return_keep``). Only the kept
    rows' cross-entropy is differentiated.
    """
    if isinstance(selector, str):
        selector = Selector(selector, ratio, seed=generator)
    elif generator is not None:
        raise ValueError("generator= goes with a method name; a Selector draws from its own seed")
    fused = getattr(logits, "token_loss", None)
    shape = tuple(fused.shape) if fused is not None else tuple(logits.shape[:2])
    if (fused is None and logits.dim() != 3) or tuple(labels.shape) != shape:
        raise ValueError(
            f"expected logits [B, L, V] (or a fused output's token_loss [B, L]) and labels "
            f"[B, L], got {shape if fused is not None else tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    B, L = shape
    device = (fused if fused is not None else logits).device
    labels = labels.to(device)
    targets = shift_labels(labels, ignore_index)
    if fused is not None:
        valid, scores = logits.valid, fused.detach()
    else:
        plan = _plan_of(logits, plan)
        layout = plan.layout if plan is not None else None
        valid = valid_rows(labels, attention_mask, position_ids, ignore_index, layout)
        scores = token_losses(logits, targets, ignore_index)
    ref = None
    if reference_logits is not None:
        if tuple(reference_logits.shape[:2]) != shape:
            raise ValueError(
                f"reference logits have shape {tuple(reference_logits.shape)}, expected [{B}, {L}, V]"
            )
        ref = token_losses(reference_logits.detach(), targets, ignore_index)
    elif reference_loss is not None:
        ref = _rows(reference_loss.detach().float().to(device), (B, L), "reference_loss")
    count = count if selector.filters else None
    keep = selector(scores, valid, ref, count=count)
    if fused is not None:
        loss = filtered_loss(fused, keep, num_items, plan, count)
        return (loss, keep) if return_keep else loss
    idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    V = logits.shape[-1]
    acc = torch.promote_types(logits.dtype, torch.float32)  # float32 as HF does; float64 stays
    kept = F.cross_entropy(
        logits.reshape(-1, V)[idx].to(acc), targets.reshape(-1)[idx], reduction="sum"
    )
    loss = kept / (idx.numel() if num_items is None else num_items)
    if plan is not None:
        _fill(plan, keep, count, valid)
    return (loss, keep) if return_keep else loss
