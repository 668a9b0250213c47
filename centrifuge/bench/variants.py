"""The steps a benchmark compares. A variant turns (input_ids, ratio) into a
scalar loss whose ``backward()`` is the timed backward; selection (the model's
own loss, top-ρ per batch) runs inside the forward for every filtered variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from centrifuge.cuda_graphs import GraphedStep, use_compact_path
from centrifuge.models import LlamaForCausalLM
from centrifuge.models.config import ModelConfig
from centrifuge.plan import BackwardOptions
from centrifuge.selection import Selector, num_keep


@dataclass
class Variant:
    name: str  # short key used in tables: dense, masked, centrifuge, hf-masked, ...
    label: str  # what a reader sees
    loss: Callable[[torch.Tensor, float], torch.Tensor]
    filtered: bool = True  # False: ratio does not apply (always all tokens)
    module: torch.nn.Module | None = None
    # The step can be captured as CUDA graphs (graphed): no host sync, no copy
    # from the host, no draw from a CPU generator.
    capturable: bool = False


def _host_count(selector: Selector, n_valid: int) -> int | None:
    """The rows ``selector`` keeps of ``n_valid`` labelled rows, known on the host
    as centrifuge train knows it, so that selection and plan skip host syncs;
    None when it keeps every valid row."""
    return num_keep(n_valid, selector.ratio) if selector.filters else None


class SFTLabels:
    """Labels of a bench batch. prompt_share = 0: every token is labelled (the
    last row of a row has no target). prompt_share = s > 0: supervised
    fine-tuning, the first round(s * L) tokens of every row are a prompt labelled
    -100, so rows 0 .. P-2 are context rows and rows P-1 .. L-2 carry the loss."""

    def __init__(self, prompt_share: float):
        if not 0.0 <= prompt_share < 1.0:
            raise ValueError(f"prompt share must lie in [0, 1), got {prompt_share}")
        self.share = prompt_share
        self._cache: dict = {}

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None, int]:
        """ids [B, L] -> (labels [B, L], labelled rows, [B, L] bool context rows or
        None without a prompt, context rows), on ids' device and made once per
        shape, the counts known on the host: a pretraining step gets ``ids``
        itself, and no step copies anything from the host."""
        if not self.share:
            return ids, ids.shape[0] * (ids.shape[1] - 1), None, 0
        key = (tuple(ids.shape), ids.device)
        if key not in self._cache:
            B, L = ids.shape
            P = round(self.share * L)
            if not 2 <= P <= L - 2:
                raise ValueError(f"a prompt share of {self.share} leaves no prompt or no completion "
                                 f"in rows of {L} tokens")  # fmt: skip
            prompt = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
            prompt[:, :P] = True
            context = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
            context[:, : P - 1] = True
            self._cache[key] = (prompt, B * (L - P), context, B * (P - 1))
        prompt, n_valid, context, n_context = self._cache[key]
        return ids.masked_fill(prompt, -100), n_valid, context, n_context


def native_variants(model: LlamaForCausalLM, checkpointing: bool = False,
                    knobs: tuple[str, ...] = (), prompt_share: float = 0.0,
                    captured: bool = False) -> list[Variant]:  # fmt: skip
    """dense, masked, centrifuge on the native model, and one Centrifuge variant
    per knob spec (``BackwardOptions.parse``: e.g. ``extra=0.3``, ``exact_layers=2``
    or ``kv_projections=1``); with ``checkpointing`` also each of them with activation
    checkpointing (``-ckpt``: the dense and masked steps recompute whole layers,
    Centrifuge's recompute runs on kept rows). ``prompt_share`` > 0 times
    supervised fine-tuning (:class:`SFTLabels`: dense = plain SFT), and adds
    Centrifuge with the prompt as constants (``context=constant``). captured: the
    steps are for CUDA graphs (:func:`graphed_variants`), where ``auto`` takes the
    compact path, as ``centrifuge train --cuda-graphs`` does (``use_compact_path``)."""
    sft = SFTLabels(prompt_share)

    def dense(ids, ratio):
        labels, n_valid, _, _ = sft(ids)
        out = model(ids, labels=labels, backward="exact")
        return out.plan.loss(out.token_loss, out.valid, n_valid)

    def filtered(mode):
        if captured:
            mode = BackwardOptions.of(mode)
            use_compact_path(mode)
        rb = BackwardOptions.of(mode).backward_ratio

        def step(ids, ratio):
            labels, n_valid, context, n_context = sft(ids)
            out = model(ids, labels=labels, backward=mode)
            out.plan.set_context(context, n_context)  # known on the host, as centrifuge train knows it
            selector = Selector("loss", ratio)
            count = _host_count(selector, n_valid)
            if rb is None:
                keep = selector(out.token_loss, out.valid, count=count)
            else:  # the rows ranked next join the backward, counted on the host too
                n_b = None if count is None else num_keep(n_valid, rb)
                keep, ranked = selector.select(out.token_loss, out.valid, count=count,
                                               backward_ratio=rb, backward_count=n_b)  # fmt: skip
                out.plan.set_ranked(ranked, None if count is None else n_b - count)
            return out.plan.loss(out.token_loss, keep, count)

        return step

    variants = [
        Variant("dense", "dense (no filtering)" if not prompt_share else "plain SFT (no filtering)",
                dense, filtered=False, module=model, capturable=True),
        Variant("masked", "masked-loss filtering", filtered("exact"), module=model, capturable=True),
        Variant("centrifuge", "Centrifuge", filtered("amplified"), module=model, capturable=True),
    ]
    if prompt_share and "context=constant" not in knobs:
        knobs = (*knobs, "context=constant")
    for spec in knobs:
        opts = BackwardOptions.parse(spec)
        opts.check_layers(model.config.num_layers)
        name = "centrifuge" + opts.describe().removeprefix("amplified")
        # Sampled rows are drawn on a CPU generator and indexed with host syncs.
        variants.append(Variant(name, f"Centrifuge, {spec}", filtered(opts), module=model,
                                capturable=opts.extra == 0))  # fmt: skip
    if not checkpointing:
        return variants

    def recomputing(step, on: bool):
        def run(ids, ratio):  # the variants share one model: set its mode every step
            (model.activation_checkpointing_enable if on else model.activation_checkpointing_disable)()
            return step(ids, ratio)

        return run

    return [
        Variant(v.name + suffix, v.label + label, recomputing(v.loss, on), v.filtered, model,
                v.capturable)
        for on, suffix, label in ((False, "", ""), (True, "-ckpt", " + checkpointing"))
        for v in variants
    ]


def graphed_variants(variants: list[Variant]) -> list[Variant]:
    """The capturable variants again, each step captured as two CUDA graphs
    (forward, backward) on first use per input and ratio and replayed after
    (``-graph``: the same kernels without the host issuing them one by one).
    All captures share one memory pool: the bench runs one step at a time."""
    pool = torch.cuda.graph_pool_handle()

    def graphed(v: Variant) -> Variant:
        steps: dict[tuple, GraphedStep] = {}

        def step(ids, ratio):
            key = (ids.data_ptr(), tuple(ids.shape), ratio if v.filtered else None)
            if key not in steps:
                steps[key] = GraphedStep(lambda: (v.loss(ids, ratio),), list(v.module.parameters()),
                                         pool=pool)  # fmt: skip
            graph = steps[key]
            graph.forward()
            return graph  # the timed backward() replays its backward graph

        return Variant(v.name + "-graph", v.label + ", CUDA graphs", step, v.filtered, v.module)

    return [graphed(v) for v in variants if v.capturable]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """Wraps every attention and MLP projection of ``model`` in a peft LoRA adapter
    (alpha = 2 rank, no dropout) and freezes the rest, in place; returns ``model``
    (the variants call it directly, as a PeftModel would)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, cfg).get_base_model()


def hf_model(config: ModelConfig, dtype: torch.dtype, device, attn: str = "sdpa", checkpointing=False):
    """transformers' own model class for ``config`` (random weights), in training
    mode; ``checkpointing``: with ``gradient_checkpointing_enable()``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config.to_hf_dict())
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=dtype)
    if checkpointing:  # transformers >= 5.x renames gradient_ to activation_checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    return model.to(device).train()


def _hf_token_loss_and_keep(model, ids, ratio):
    """What users run today up to the loss: logits, per-token cross-entropy, top-ρ keep."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    valid = torch.ones_like(token_loss, dtype=torch.bool)
    return token_loss, Selector("loss", ratio)(token_loss, valid)


def hf_masked_variant(model, name="hf-masked", label="HF transformers, masked loss") -> Variant:
    """What users run today: logits, per-token cross-entropy, masked mean."""

    def step(ids, ratio):
        token_loss, keep = _hf_token_loss_and_keep(model, ids, ratio)
        return (token_loss * keep).sum() / keep.sum()

    return Variant(name, label, step, module=model)


def hf_patched_variant(model) -> Variant:
    """``hf-masked`` with the one-line change: the same HF model and step, after
    ``centrifuge.patch(model)``, with ``filtered_loss`` in place of the masked mean."""
    from centrifuge.integrations import filtered_loss, patch

    patch(model)

    def step(ids, ratio):
        return filtered_loss(*_hf_token_loss_and_keep(model, ids, ratio))

    checkpointed = any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
    ckpt = " + gradient checkpointing" if checkpointed else ""
    return Variant("hf-patched", f"HF transformers{ckpt} + centrifuge.patch", step, module=model)


def hf_patched_labels_variant(model, name="hf-patched-labels",
                              label="HF transformers + centrifuge.patch, labels=") -> Variant:  # fmt: skip
    """The full-speed form on a patched HF model: ``model(..., labels=)`` returns
    per-token losses from the fused norm + LM head + cross-entropy (no logits),
    the selection reads them, ``filtered_loss`` fills the plan."""
    from centrifuge.integrations import filtered_loss, patch

    patch(model)

    def step(ids, ratio):
        out = model(input_ids=ids, labels=ids)
        selector = Selector("loss", ratio)
        count = _host_count(selector, ids.shape[0] * (ids.shape[1] - 1))
        keep = selector(out.token_loss, out.valid, count=count)
        return filtered_loss(out.token_loss, keep, count=count)

    return Variant(name, label, step, module=model)


def hf_liger_variant(model) -> Variant:
    """HF + Liger-Kernel (fused RMSNorm, SwiGLU, RoPE, fused linear-CE), masked
    loss through ``labels = -100`` on filtered rows — Liger's fastest form. Its
    fused loss returns no per-token losses, so the keep mask is drawn at random
    (a precomputed-scores setting): the peer pays no selection cost at all."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)  # also patches module-level RoPE
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step(ids, ratio):
        labels = ids.clone()
        drop = torch.rand(ids.shape, generator=gen) >= ratio
        labels[drop.to(ids.device)] = -100
        return model(input_ids=ids, labels=labels, use_cache=False).loss

    return Variant("hf-liger-masked", "HF + Liger-Kernel, masked loss", step, module=model)
