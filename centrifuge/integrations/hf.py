"""``centrifuge.patch(model)``: Hugging Face transformers models with the compact backward.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` and
``MistralForCausalLM`` of transformers 5.x. The patch replaces, per module
instance, the ``forward`` of the causal LM, of every decoder layer, of the final
norm and of the LM head; a decoder layer called with gradients from anywhere but
the causal LM forward raises, since a wrapper that calls the backbone itself
would train dense. Nothing else changes: the same parameters (so
``state_dict`` names, saving and loading), the same class, the same forward
signature (so ``Trainer`` and ``generate`` introspection see what they expect).

When a forward takes the compact path (gradients enabled, no KV cache, no
attention weights requested) the patched causal LM forward creates a
:class:`HFPlan` before the layers run; every decoder layer then runs as
:func:`centrifuge.models.layer.decoder_layer` (one autograd Function, dense
forward, backward on kept rows), the final norm as ``RMSNormFunction`` and the
LM head as :class:`CompactLinearFunction`. All of them capture the plan in their
autograd nodes, so it lives exactly as long as that forward's graph: several
forwards before one backward (gradient accumulation) each keep their own plan,
and nothing outlives the graph. The user's loss call
(:func:`centrifuge.integrations.loss.filtered_loss`) finds the plan by walking
the graph back from the per-token losses and fills it. A forward whose plan is
never filled differentiates like ordinary dense training.

Given ``labels=`` (a training forward), the final norm, the LM head and the
cross-entropy run fused (:func:`centrifuge.ops.linear_ce.norm_linear_cross_entropy`):
no [B, L, vocab] logits; the output (``CausalLMTokenLossOutput``) carries
``token_loss`` [B, L] and ``valid`` [B, L], ``loss`` over the valid rows and
``logits = None``. Rows whose label is ``-100`` before a labelled row (a prompt)
are the plan's context rows (:func:`centrifuge.plan.context_rows`).

With transformers' activation checkpointing on (``gradient_checkpointing_enable()``
or ``activation_checkpointing_enable()``, per layer), a checkpointed layer runs
as ``decoder_layer(..., recompute=True)``: it saves its input and the attention
lse only, and its backward recomputes K/V for every row and the rest of the
layer for the kept rows (transformers' own checkpoint wrapper is not used).

Every other call (``torch.no_grad``, ``generate``, ``use_cache=True``, a given
``past_key_values``, ``output_attentions=True``) runs the original forward
untouched.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from centrifuge.models.layer import (
    PROJECTIONS,
    LayerShape,
    decoder_layer,
    layer_weights,
    projection_weights,
)
from centrifuge.ops.linear_ce import IGNORE_INDEX, norm_linear_cross_entropy
from centrifuge.ops.rmsnorm import rms_norm
from centrifuge.plan import BackwardOptions, Layout, Plan, context_rows

SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class HFPlan(Plan):
    """The plan of one patched forward, plus what the loss call must check.

    attention_mask: [B, L] bool or None (padding rows may never be kept);
    keep: [B, L] bool once a loss filled the plan (None before).
    """

    def __init__(self, layout: Layout, attention_mask: torch.Tensor | None,
                 backward: BackwardOptions | None = None, path: str = "compact",
                 num_layers: int | None = None):  # fmt: skip
        super().__init__(layout, backward or "amplified", path, num_layers)
        self.attention_mask = attention_mask
        self.keep: torch.Tensor | None = None
        self.asynchronous = False  # checks as device asserts (filled with a host count)

    def fill(self, keep: torch.Tensor, count: int | None = None) -> None:
        """Record the kept rows ([B, L] bool). One keep mask per forward.
        count: ``keep.sum()`` known on the host (:meth:`Plan.set_keep`): then no
        check here or in the backward waits for the device; they become
        asynchronous device asserts."""
        self.check_keep(keep)
        if self.keep is not None:
            if torch.equal(self.keep, keep):
                return
            raise RuntimeError(
                "this forward's plan was already filled by another loss call with a different "
                "keep mask: call the filtered loss once per forward"
            )
        self.asynchronous = count is not None
        if self.attention_mask is not None:
            self._check(~(keep & ~self.attention_mask).any(), ValueError,
                        "the keep mask keeps padding positions (attention_mask == 0); padding "
                        "rows carry no loss and cannot be kept")  # fmt: skip
        self.set_keep(keep, count)
        self.keep = keep

    def _check(self, ok: torch.Tensor, error: type, msg: str) -> None:
        if self.asynchronous:
            torch._assert_async(ok, msg)
        elif not bool(ok):
            raise error(msg)


def _check_rows(has_grad: torch.Tensor, plan: HFPlan) -> None:
    """Raise if a filtered row receives gradient (has_grad: [B * L] bool): the
    loss then depends on rows the compact backward drops, and would be wrong."""
    plan._check(
        ~(has_grad & ~plan.keep.reshape(-1)).any(), RuntimeError,
        "the loss sends gradient to filtered rows: with Centrifuge only the kept rows may "
        "carry loss. Are the per-token losses given to filtered_loss aligned with the "
        "logits (logits[:, :-1] or all rows), and is nothing else (e.g. out.loss) added "
        "to the loss?",
    )


class CheckedRowsFunction(torch.autograd.Function):
    """Identity on per-token losses [B, L] whose backward checks, once a loss filled
    the plan, that no filtered row receives gradient (the fused LM head +
    cross-entropy reads only the kept rows' gradient and would ignore the rest)."""

    @staticmethod
    def forward(ctx, token_loss, plan: HFPlan):
        ctx.plan = plan
        return token_loss.clone()  # [B, L]: a copy costs nothing next to the head

    @staticmethod
    def backward(ctx, dloss):
        if ctx.plan.keep is not None:
            _check_rows(dloss.reshape(-1) != 0, ctx.plan)
        return dloss, None


class CompactLinearFunction(torch.autograd.Function):
    """``y = x @ w.T`` (the LM head) whose backward reads only the plan's kept rows.

    x: [B, L, d], w: [V, d] -> y: [B, L, V] (x.dtype). With ``check`` the backward
    verifies that the incoming gradient is zero on every filtered row: otherwise
    the loss depends on rows the plan drops, and the compact backward would be wrong.
    """

    @staticmethod
    def forward(ctx, x, w, plan: HFPlan, check: bool):
        ctx.save_for_backward(x, w)
        ctx.plan, ctx.check = plan, check
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        plan = ctx.plan
        d, V = x.shape[-1], w.shape[0]
        x2, dy2 = x.reshape(-1, d), dy.reshape(-1, V)
        if ctx.check and plan.keep is not None:
            lo, hi = torch.aminmax(dy2, dim=1)  # one pass, no [N, V] temporary
            _check_rows((lo != 0) | (hi != 0), plan)
        idx = plan.keep_idx
        dyk, xk = (dy2, x2) if idx is None else (dy2[idx], x2[idx])
        dxk = dyk @ w
        dx = dxk if idx is None else x2.new_zeros(x2.shape).index_copy_(0, idx, dxk)
        # A frozen LM head (LoRA fine-tuning) gets no weight-gradient GEMM.
        dw = (dyk.t() @ xk).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx.view_as(x), dw, None, None


# --- support checks ---------------------------------------------------------------


def _supported_classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED_MODELS)


def _check_layer(layer, config, index: int) -> None:
    where = f"decoder layer {index}"
    a = layer.self_attn
    bias = {
        p: projection_weights(getattr(getattr(layer, block), attr), f"{where}: {block}.{attr}")[1]
        for p, (block, attr) in PROJECTIONS.items()
    }
    if any(bias[p] is not None for p in ("wg", "wu", "wd")):
        raise ValueError(f"{where}: MLP biases (mlp_bias=True) are not supported")
    if bias["wo"] is not None:
        raise ValueError(f"{where}: an o_proj bias (Llama attention_bias=True) is not supported")
    biases = [bias[p] is not None for p in ("wq", "wk", "wv")]
    if any(biases) and not all(biases):
        raise ValueError(f"{where}: q/k/v projections must all have a bias or none")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: activation {act!r} is not supported (SwiGLU with silu only)")
    head_dim = a.head_dim
    if abs(a.scaling - head_dim**-0.5) > 1e-12:
        raise ValueError(f"{where}: attention scaling {a.scaling} differs from head_dim**-0.5")
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if any(getattr(n, "offset", 0.0) for n in norms):  # Liger's Gemma-style (1 + w) norm
        raise ValueError(f"{where}: RMSNorm with a weight offset (Gemma-style) is not supported")
    eps = {n.variance_epsilon for n in norms}
    if hasattr(a, "q_norm"):
        eps |= {a.q_norm.variance_epsilon, a.k_norm.variance_epsilon}
    if len(eps) != 1:
        raise ValueError(f"{where}: the layer's RMSNorms use different eps {sorted(eps)}")


def _layer_shape(layer, config, index: int) -> LayerShape:
    a = layer.self_attn
    return LayerShape(
        config.num_attention_heads, config.num_key_value_heads, a.head_dim,
        layer.input_layernorm.variance_epsilon, index,
    )  # fmt: skip


def _layer_window(layer, config) -> int | None:
    """The sliding window this layer's attention applies, if any."""
    a = layer.self_attn
    if hasattr(a, "sliding_window"):  # Qwen2/Qwen3: per layer type
        return a.sliding_window
    return getattr(config, "sliding_window", None)  # Mistral: every layer


def _liger_ops(model) -> list[str]:
    """The Liger-Kernel ops a model carries: modules of a Liger class, or with a
    forward Liger bound to the instance (``apply_liger_kernel_to_*(model=...)``)."""
    found = set()
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        for origin in (type(module), getattr(fwd, "__func__", None)):
            name = getattr(origin, "__qualname__", "")
            if getattr(origin, "__module__", "").startswith("liger_kernel"):
                found.add(name.split(".")[0])
    forward = getattr(type(model).forward, "__module__", "")
    if forward.startswith("liger_kernel"):  # applied to the class before loading
        found.add(type(model).forward.__name__)
    return sorted(found)


# --- the patch --------------------------------------------------------------------


class _PatchState:
    """Shared by the patched modules of one model: the plan of the forward that
    is running (None outside a compact forward), and the backward options
    every plan gets."""

    def __init__(self, check_rows: bool, backward: BackwardOptions | None, layer_params: int):
        self.plan: HFPlan | None = None
        self.check_rows = check_rows
        self.layer_params = layer_params  # of one decoder layer: auto's backward path reads it
        self.recompute: frozenset[int] = frozenset()  # ids of the layers that recompute
        self.backward = backward or BackwardOptions()
        self.given_backward = backward  # as given to patch (patch_options)
        # Set while a forward with labels runs fused: the final norm passes its
        # input through and the LM head computes the per-token losses instead.
        self.head: _FusedHead | None = None
        # True while the patched causal LM forward runs (either path): a decoder
        # layer called outside it means a wrapper bypasses the patch.
        self.inside = False


class _FusedHead:
    """What the patched LM head needs to run norm + head + cross-entropy fused:
    the final norm module, targets [B, L] int64 (already shifted, ignore_index
    on every row that is not valid) and the ignore value."""

    def __init__(self, norm: nn.Module, targets: torch.Tensor, ignore_index: int):
        self.norm, self.targets, self.ignore_index = norm, targets, ignore_index


class _PatchedForward:
    """An instance-level ``forward`` for one module. A plain object (not a
    closure), so patched models still deep-copy and pickle; it reports the
    original forward's signature to ``inspect`` (Trainer and generate read it).

    ``previous`` is the instance-level forward the module had before (Liger-Kernel
    binds its RMSNorm and its fused-loss causal LM forward this way): every call
    that does not take the compact path runs it, and ``unpatch`` restores it."""

    def __init__(self, module: nn.Module, kind: str, state: _PatchState):
        self.module, self.kind, self.state = module, kind, state
        self.previous = module.__dict__.get("forward")

    @property
    def original(self):
        return self.previous or type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self):
        return inspect.signature(self.original)

    def __call__(self, *args, **kwargs):
        return _FORWARDS[self.kind](self.module, self.state, self.original, *args, **kwargs)


_SIGNATURES: dict = {}


def _bind(module, args, kwargs) -> inspect.BoundArguments:
    """Bind a call to the module class's forward signature (cached per class)."""
    cls = type(module)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    return sig.bind(module, *args, **kwargs)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def layout_for(
    batch: int,
    seqlen: int,
    device,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Layout:
    """The attention layout transformers applies to a training forward (no cache).

    With a 2D ``attention_mask`` transformers masks padding and ignores packing;
    without one it isolates documents where ``position_ids`` break the +1 run.
    attention_mask: [B, L] (0 = padding; real tokens must be one contiguous run
    per row), position_ids: [B, L] or [1, L] or [L].
    """
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
            raise ValueError(
                f"attention_mask must be a 2D [batch, seq] padding mask of shape {(batch, seqlen)}, "
                f"got {tuple(attention_mask.shape)} (custom 4D masks are not supported)"
            )
        mask = attention_mask.to(device).bool()
        run_starts = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)
        if bool((run_starts > 1).any()):
            raise ValueError(
                "attention_mask has holes (several runs of real tokens in one row); pass packed "
                "documents as position_ids restarting at 0 and no attention_mask instead"
            )
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
        return Layout.build(batch, seqlen, device, pos, mask)
    return Layout.build(batch, seqlen, device, position_ids)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[B, L] unshifted labels -> [B, L] targets: row t predicts labels[t + 1]."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def valid_rows(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    layout=None,
) -> torch.Tensor:
    """[B, L] bool: rows that have a target. Not valid: ``ignore_index`` targets,
    padding, and the last row of every document (it would predict the next
    document's first token). labels: [B, L] unshifted (HF convention)."""
    B, L = labels.shape
    if layout is None:
        layout = layout_for(B, L, labels.device, attention_mask, position_ids)
    valid = (shift_labels(labels, ignore_index) != ignore_index) & ~layout.last_rows()
    if attention_mask is not None:
        valid &= attention_mask.to(labels.device).bool()
    return valid


def _dense_reason(model, a: dict) -> str | None:
    """Why this call runs the original forward (None: the compact path applies)."""
    if not torch.is_grad_enabled():
        return "gradients disabled"
    if a.get("past_key_values") is not None:
        return "a KV cache was given"
    if a.get("use_cache") is True:
        return "use_cache=True"
    kw = a.get("kwargs") or {}
    if kw.get("output_attentions"):
        return "output_attentions=True"
    if not any(p.requires_grad for p in model.parameters()):
        return "no parameter requires grad"
    return None


def _check_compact_call(model, a: dict, B: int, L: int, layout: Layout) -> None:
    if (a.get("kwargs") or {}).get("fused_lm_head"):
        raise ValueError(
            "fused_lm_head=True: TRL's SFTTrainer computes its loss with its own fused LM head, "
            "which bypasses centrifuge.patch and would train dense; train with "
            "centrifuge.CentrifugeSFTTrainer instead"
        )
    if model.training and getattr(model.config, "attention_dropout", 0.0):
        raise ValueError("attention dropout is not supported by the compact path; set attention_dropout=0")
    for i, layer in enumerate(model.model.layers):
        _check_layer(layer, model.config, i)  # projections may have been wrapped after patching
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if _recompute(layer) and getattr(func, "func", func) is not torch.utils.checkpoint.checkpoint:
            raise NotImplementedError(
                f"decoder layer {i}: a custom activation checkpointing function (e.g. offload=True) "
                "is not supported on a Centrifuge-patched model: its layers recompute on kept rows "
                "with their own checkpointing, which keeps activations on the device"
            )
        window = _layer_window(layer, model.config)
        if window is not None and layout.max_seqlen > window:
            raise ValueError(
                f"a sequence of {layout.max_seqlen} tokens exceeds decoder layer {i}'s sliding "
                f"window ({window}); sliding-window attention is not supported by the compact path"
            )


def _causal_lm_forward(model, state: _PatchState, original, *args, **kwargs):
    outer, state.inside = state.inside, True
    try:
        return _causal_lm_call(model, state, original, *args, **kwargs)
    finally:
        state.inside = outer


def _causal_lm_call(model, state: _PatchState, original, *args, **kwargs):
    a = _bind(model, args, kwargs).arguments
    if state.plan is not None or _dense_reason(model, a) is not None:
        return original(*args, **kwargs)
    ref = a.get("input_ids")
    if ref is None:
        ref = a.get("inputs_embeds")
    B, L = ref.shape[:2]
    mask = a.get("attention_mask")
    layout = layout_for(B, L, ref.device, mask, a.get("position_ids"))
    _check_compact_call(model, a, B, L, layout)
    path = state.backward.choose_path(B * L, state.layer_params, ref.device.type)
    plan = HFPlan(layout, None if mask is None else mask.to(ref.device).bool(), state.backward, path,
                  len(model.model.layers))
    # A training forward needs no cache; without one transformers also
    # isolates packed documents, as the layout above does.
    a["use_cache"] = False
    labels, kw = a.get("labels"), a.get("kwargs") or {}
    ignore_index = kw.get("ignore_index", IGNORE_INDEX)
    head = None
    if labels is not None and _fusable(model, a):
        if tuple(labels.shape) != (B, L):
            raise ValueError(f"labels must be [batch, seq] = {(B, L)}, got {tuple(labels.shape)}")
        labels = labels.to(ref.device)
        valid = valid_rows(labels, mask, None, ignore_index, layout)
        plan.set_context(context_rows(valid, layout))  # counted now when on the CPU
        targets = shift_labels(labels, ignore_index).masked_fill(~valid, ignore_index)
        head = _FusedHead(model.model.norm, targets, ignore_index)
        a["labels"] = None  # transformers' loss would need the logits
    # Centrifuge's recompute replaces transformers' checkpointing: some
    # transformers versions wrap the layer call itself in torch's checkpoint
    # (GradientCheckpointingLayer.__call__), which must not run around a patched
    # layer, so the switch is off for the duration of this forward.
    ckpt = [layer for layer in model.model.layers if _recompute(layer)]
    state.plan, state.recompute, state.head = plan, frozenset(map(id, ckpt)), head
    for layer in ckpt:
        layer.gradient_checkpointing = False
    # As keywords: BoundArguments.args reads the signature again, which
    # torch.compile cannot trace (a graph break).
    call = {k: v for k, v in a.items() if k not in ("self", "kwargs")}
    try:  # the class's forward: Centrifuge's ops replace what Liger bound to the instance
        out = type(model).forward(model, **call, **kw)
    finally:
        state.plan, state.recompute, state.head = None, frozenset(), None
        for layer in ckpt:
            layer.gradient_checkpointing = True
    if head is None:
        return out
    token_loss = out.logits  # the fused LM head returned the per-token losses
    n = kw.get("num_items_in_batch")
    loss = token_loss.sum() / (valid.sum() if n is None else n)
    from centrifuge.integrations.outputs import CausalLMTokenLossOutput  # needs transformers

    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    return CausalLMTokenLossOutput(loss=loss, logits=None, token_loss=token_loss, valid=valid, **fields)


def _fusable(model, a: dict) -> bool:
    """A forward with labels runs norm + LM head + cross-entropy fused unless it
    asks for what the fusion does not produce: logits of some rows only
    (``logits_to_keep``) or the hidden states (whose last entry is the norm's
    output). Those run transformers' own loss on the logits."""
    kw = a.get("kwargs") or {}
    hidden = kw.get("output_hidden_states")
    if hidden is None:
        hidden = getattr(model.config, "output_hidden_states", False)
    keep = a.get("logits_to_keep", 0)
    return not hidden and isinstance(keep, int) and keep == 0


def _recompute(layer) -> bool:
    """transformers' activation checkpointing is on for this layer (per layer:
    ``every_n_layers`` may leave some out); Centrifuge's recompute replaces it."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


def _bypassed(layer, state: _PatchState) -> bool:
    """A decoder layer called with gradients outside the patched causal LM forward:
    a wrapper that calls the backbone itself (TRL's fused LM head) bypasses the
    patch, and training would run dense."""
    return not state.inside and torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())


def _layer_forward(layer, state: _PatchState, original, *args, **kwargs):
    plan = state.plan
    if plan is None:
        if _bypassed(layer, state):
            raise RuntimeError(
                "a decoder layer of a Centrifuge-patched model was called with gradients outside "
                "the patched causal LM forward: a wrapper (e.g. TRL's SFTTrainer fused LM head) "
                "bypasses centrifuge.patch, and training would run dense without token filtering. "
                "Call the model itself (train with centrifuge.CentrifugeSFTTrainer under TRL), or "
                "unpatch it"
            )
        return original(*args, **kwargs)
    a = _bind(layer, args, kwargs).arguments
    x = a["hidden_states"]
    B, L, _ = x.shape
    if (B, L) != plan.shape:
        raise RuntimeError(f"decoder layer input has shape {tuple(x.shape)}, the plan {plan.shape}")
    cos, sin = a["position_embeddings"]
    dtype = _compute_dtype(x)
    D = cos.shape[-1]
    cos, sin = cos.to(dtype).expand(B, L, D), sin.to(dtype).expand(B, L, D)
    w, dropout = layer_weights(layer)
    # Under autocast the fp32 weights are cast here, differentiably, and the
    # layer computes in the autocast dtype; the residual stream returns in x.dtype.
    w = {k: None if t is None else t.to(dtype) for k, t in w.items()}
    with torch.autocast(x.device.type, enabled=False):
        y = decoder_layer(x.to(dtype), cos, sin, plan, layer._centrifuge_shape, w,
                          id(layer) in state.recompute, dropout)  # fmt: skip
    return y.to(x.dtype)


def _norm_forward(norm, state: _PatchState, original, hidden_states):
    plan = state.plan
    if plan is None or tuple(hidden_states.shape[:2]) != plan.shape:
        return original(hidden_states)
    if state.head is not None:
        return hidden_states  # the LM head applies the norm, fused with the cross-entropy
    dtype = _compute_dtype(hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):
        return rms_norm(hidden_states.to(dtype), norm.weight.to(dtype), norm.variance_epsilon, plan)


# The LM head's Functions are not traced by torch.compile: a traced backward
# would read the plan (and skip the rows check) as they were at the forward,
# before the loss filled the plan (docs/design.md, "torch.compile").
@torch.compiler.disable
def _lm_head_forward(head, state: _PatchState, original, x):
    plan = state.plan
    if plan is None or x.dim() != 3 or tuple(x.shape[:2]) != plan.shape or head.bias is not None:
        if state.head is not None:  # never logits of the un-normed rows in place of losses
            raise RuntimeError(f"LM head input {tuple(x.shape)} does not match the fused forward's rows")
        return original(x)  # e.g. logits_to_keep sliced the rows
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        if state.head is None:
            return CompactLinearFunction.apply(x.to(dtype), head.weight.to(dtype), plan, state.check_rows)
        return _fused_head_loss(x.to(dtype), head.weight.to(dtype), state.head, plan, state.check_rows)


def _fused_head_loss(x, w, fused: _FusedHead, plan: HFPlan, check: bool) -> torch.Tensor:
    """x: [B, L, d] before the final norm, w: [V, d] -> per-token losses [B, L]
    (float32; float64 for float64 x). The norm's output and the logits are never saved."""
    norm = fused.norm
    token_loss, _ = norm_linear_cross_entropy(
        x, norm.weight.to(x.dtype), w, fused.targets, plan, norm.variance_epsilon, fused.ignore_index
    )
    return CheckedRowsFunction.apply(token_loss, plan) if check else token_loss


_FORWARDS = {
    "causal_lm": _causal_lm_forward,
    "layer": _layer_forward,
    "norm": _norm_forward,
    "lm_head": _lm_head_forward,
}


def _patched_modules(model):
    yield model, "causal_lm"
    for layer in model.model.layers:
        yield layer, "layer"
    yield model.model.norm, "norm"
    yield model.lm_head, "lm_head"


def _causal_lm(model):
    """The transformers causal LM inside a peft ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None and not isinstance(model, _supported_classes()) else model


def is_patched(model) -> bool:
    return isinstance(_causal_lm(model).__dict__.get("forward"), _PatchedForward)


def patch(model, check_rows: bool = True, backward: BackwardOptions | None = None):
    """Give a transformers Llama/Qwen2/Qwen3/Mistral causal LM the compact backward.

    Patches the instance in place and returns it. Weights, parameter names,
    saving, generation and every no-grad or cached call stay as before; a
    training forward's layers run as Centrifuge decoder layers (identical
    activations, backward on the kept rows once a filtered loss fills the plan).
    check_rows: the backward verifies that no filtered row receives gradient (one
    pass over the logits' gradient, or over the per-token losses' on the fused
    path) and raises if one does.
    backward: :class:`~centrifuge.plan.BackwardOptions` (mode ``amplified``) to let
    some gradient reach filtered rows: sampled filtered rows (``extra``) or the
    exact backward in the bottom ``exact_layers``; None = plain amplified.
    Patching a patched model is a no-op. A peft ``PeftModel`` is patched through
    its base model (LoRA adapters on the projections get compact rank-r
    gradients, frozen weights none); peft may also wrap a patched model.
    """
    outer, model = model, _causal_lm(model)
    if not isinstance(model, _supported_classes()):
        raise TypeError(
            f"centrifuge.patch supports {', '.join(SUPPORTED_MODELS)} (transformers 5.x); "
            f"got {type(model).__name__}"
        )
    if is_patched(model):
        return outer
    config = model.config
    for i, layer in enumerate(model.model.layers):
        _check_layer(layer, config, i)
    if model.lm_head.bias is not None:
        raise ValueError("an LM head with a bias is not supported")
    if backward is not None:
        if backward.mode != "amplified":
            raise ValueError(
                "patch(backward=...) takes amplified options; for the exact masked-loss "
                "backward use the unpatched model"
            )
        if backward.backward_ratio is not None:
            raise ValueError(
                "patch(backward=...) does not take backward_ratio: the rows ranked next come "
                "from the selection, and the Hugging Face losses take none yet (the native "
                "model and centrifuge train do)"
            )
        backward.check_layers(len(model.model.layers))
    liger = _liger_ops(model)
    if liger:
        warnings.warn(
            f"centrifuge.patch: this model carries Liger-Kernel ops ({', '.join(liger)}). In "
            "training forwards Centrifuge's own fused ops replace them (the same math, with the "
            "compact backward; call the model with labels= for the fused LM head and loss); "
            "no-grad calls and generate keep Liger's",
            stacklevel=2,
        )
    state = _PatchState(check_rows, backward, sum(p.numel() for p in model.model.layers[0].parameters()))
    for i, layer in enumerate(model.model.layers):
        layer._centrifuge_shape = _layer_shape(layer, config, i)
    for module, kind in _patched_modules(model):
        module.forward = _PatchedForward(module, kind, state)
    return outer


def patch_options(model) -> dict | None:
    """The keyword arguments :func:`patch` was given for this model (``check_rows``,
    ``backward``; ``backward`` None for plain amplified), or None when it is not
    patched: ``patch(model, **patch_options(model))`` patches it the same way again."""
    if not is_patched(model):
        return None
    state = _causal_lm(model).forward.state
    return {"check_rows": state.check_rows, "backward": state.given_backward}


def unpatch(model):
    """Undo :func:`patch` (a no-op on an unpatched model); returns the model."""
    if not is_patched(model):
        return model
    outer, model = model, _causal_lm(model)
    for module, _ in _patched_modules(model):
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, _PatchedForward):
            if fwd.previous is None:
                del module.forward
            else:
                module.forward = fwd.previous
    for layer in model.model.layers:
        layer.__dict__.pop("_centrifuge_shape", None)
    return outer


def find_plan(tensor: torch.Tensor, max_nodes: int = 100_000) -> Plan | None:
    """The plan of the patched forward that ``tensor`` was computed from.

    Walks the autograd graph back from ``tensor`` and stops at the first
    Centrifuge Functions (the LM head, final norm or decoder layers), which hold
    their forward's plan. None when there is none (an unpatched model, or a
    forward that ran the original code). Raises if the tensor mixes the outputs
    of several forwards.
    """
    root = tensor.grad_fn
    if root is None:
        return None
    plans, seen, frontier = {}, {root}, [root]
    while frontier and len(seen) <= max_nodes:
        nxt = []
        for node in frontier:
            plan = getattr(node, "plan", None)
            if isinstance(node, torch.autograd.function.BackwardCFunction) and isinstance(plan, Plan):
                plans[id(plan)] = plan
                continue
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    nxt.append(child)
        frontier = nxt
    if len(plans) > 1:
        raise ValueError(
            "these per-token losses come from several forward passes; call the filtered loss "
            "once per forward (and sum the results)"
        )
    return next(iter(plans.values()), None)
