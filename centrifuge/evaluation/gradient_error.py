"""How far a backward setting's gradient is from the exact masked-loss gradient,
by parameter group: the diagnosis that comes before training runs (does the
gradient error of a knob predict its quality gap?).

A setting is a :class:`~centrifuge.plan.BackwardOptions` (``amplified`` with or
without knobs, ``context="constant"``, ...). Its gradient is taken on the same
batch and keep mask as the exact one (``backward="exact"``: the masked loss,
dense backward); sampled settings (``extra``) are averaged over draws; a
setting with a ``backward_ratio`` adds the rows the selection ranks next.
"""

from __future__ import annotations

import re

import torch

from centrifuge.plan import BackwardOptions

# Parameter name (HF names, as the native model uses) -> group.
_GROUPS = (
    (r"embed_tokens", "embedding"), (r"lm_head", "lm_head"), (r"model\.norm", "final_norm"),
    (r"q_proj|q_norm", "q"), (r"k_proj|k_norm", "k"), (r"v_proj", "v"), (r"o_proj", "o"),
    (r"mlp\.", "mlp"), (r"layernorm", "norms"),
)  # fmt: skip


def parameter_group(name: str) -> tuple[str, int | None]:
    """(group, decoder layer index or None) of a parameter name."""
    layer = re.search(r"layers\.(\d+)\.", name)
    for pattern, group in _GROUPS:
        if re.search(pattern, name):
            return group, None if layer is None else int(layer.group(1))
    return "other", None if layer is None else int(layer.group(1))


def model_gradients(model, batch: dict, keep: torch.Tensor, backward, samples: int = 1,
                    ranked: torch.Tensor | None = None) -> dict:  # fmt: skip
    """{name: gradient} of the mean loss over ``keep`` ([B, L] bool) for one
    backward setting (``"exact"`` or BackwardOptions), averaged over ``samples``
    forwards (sampled knobs draw anew each time). batch: input_ids, labels and
    optionally position_ids / attention_mask, as the native model takes them.
    ranked: [B, L] bool, the rows ranked next, for a setting with a
    ``backward_ratio`` (``Selector.select(..., backward_ratio=)``)."""
    model.zero_grad(set_to_none=True)
    kw = {k: batch[k] for k in ("position_ids", "attention_mask") if batch.get(k) is not None}
    for _ in range(samples):
        out = model(batch["input_ids"], labels=batch["labels"], backward=backward, **kw)
        if ranked is not None:
            out.plan.set_ranked(ranked)
        (out.plan.loss(out.token_loss, keep) / samples).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def agreement(got: dict, want: dict) -> dict:
    """Per group and per (group, layer): cosine similarity and relative error
    ``|got - want| / |want|`` of the concatenated gradients, and the same over all
    parameters (``"all"``). Returns {key: dict(cosine=float, rel_error=float)}
    with keys ``"all"``, ``group``, ``"group/layer"`` and ``"layer/i"`` (every
    parameter of decoder layer i)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"all": []}
    for name, w in want.items():
        g = got.get(name, torch.zeros_like(w))
        group, layer = parameter_group(name)
        pair = (g.double().flatten(), w.double().flatten())
        keys = ["all", group] + ([] if layer is None else [f"{group}/{layer}", f"layer/{layer}"])
        for key in keys:
            parts.setdefault(key, []).append(pair)
    result = {}
    for key, pairs in parts.items():
        g = torch.cat([p[0] for p in pairs])
        w = torch.cat([p[1] for p in pairs])
        denom = float(w.norm())
        result[key] = dict(
            cosine=float(g @ w) / max(float(g.norm()) * denom, 1e-300),
            rel_error=float((g - w).norm()) / max(denom, 1e-300),
        )
    return result


def diagnose(model, batch: dict, keep: torch.Tensor, settings: dict[str, BackwardOptions],
             samples: int = 1, ranked=None) -> dict:  # fmt: skip
    """{setting name: agreement with the exact gradient} for every setting.
    ranked: for settings with a ``backward_ratio``, a function of it giving the
    rows ranked next after ``keep`` ([B, L] bool; e.g. ``lambda r:
    selector.select(token_loss, valid, backward_ratio=r)[1]``)."""
    exact = model_gradients(model, batch, keep, "exact")
    out = {}
    for name, opts in settings.items():
        n = samples if opts.extra > 0 else 1
        more = None if opts.backward_ratio is None else ranked(opts.backward_ratio)
        out[name] = agreement(model_gradients(model, batch, keep, opts, n, more), exact)
    return out
