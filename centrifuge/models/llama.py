"""A native Llama-family causal LM (Llama 2/3, TinyLlama, Mistral, Qwen2/2.5/3)
written on Centrifuge's ops. Parameter names follow Hugging Face, so a local HF
safetensors checkpoint loads as it is and a saved one loads in transformers.

Typical step::

    out = model(input_ids, labels=labels)            # dense forward
    keep = selector(out.token_loss, out.valid, ref)  # pick rows
    loss = out.plan.loss(out.token_loss, keep)       # mean over kept rows
    loss.backward()                                  # compact backward
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from centrifuge.io import give_default_mode
from centrifuge.models.config import ModelConfig
from centrifuge.models.layer import LayerShape, decoder_layer, layer_weights
from centrifuge.models.tensor_parallel import local
from centrifuge.ops.linear_ce import IGNORE_INDEX, norm_linear_cross_entropy
from centrifuge.ops.rmsnorm import rms_norm
from centrifuge.ops.rope import inv_frequencies, rope_cos_sin
from centrifuge.plan import BackwardOptions, Layout, Plan


def shift_targets(labels: torch.Tensor, layout: Layout, ignore_index: int = IGNORE_INDEX):
    """Row t predicts token t+1: targets[t] = labels[t+1]. The last row of every
    document (and of every row) has no label. labels: [B, L] -> [B, L]."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets.masked_fill(layout.last_rows(), ignore_index)


@dataclass
class CausalLMOutput:
    """token_loss: [B, L] float32 (0 on invalid rows), valid: [B, L] bool,
    plan: the forward's Plan (fill it through ``plan.loss``); hidden: [B, L, d]
    (under tensor parallelism, in a forward with labels: this rank's [N/tp, d] rows)."""

    token_loss: torch.Tensor
    valid: torch.Tensor
    plan: Plan
    hidden: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        hd = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * hd, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.shape = LayerShape(c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, index)
        # Activation checkpointing: save the input (and the attention lse) only,
        # recompute the rest in the backward, on the kept rows.
        self.recompute = False

    def forward(self, x, cos, sin, plan: Plan):
        # Under autocast the fp32 master weights are cast here, differentiably,
        # so the layer computes in x.dtype and fp32 gradients reach the masters.
        w, dropout = layer_weights(self)
        w = {k: None if v is None else local(v).to(x.dtype) for k, v in w.items()}
        return decoder_layer(x, cos, sin, plan, self.shape, w, self.recompute, dropout)


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The native model. ``model.model.*`` and ``lm_head`` match HF names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Tensor parallelism (centrifuge.distributed.tensor_parallel sets it): the
        # ranks' group; the residual stream then holds this rank's rows only.
        self.tp = None
        inv = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            init_parameter(name, p, std)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent ``inv_freq`` ([head_dim / 2] float32) on
        ``device``: after a build on the meta device, which leaves it unset."""
        c = self.config
        self.inv_freq = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(device=device)

    def activation_checkpointing_enable(self) -> None:
        """Activation checkpointing in every decoder layer (transformers' names,
        old and new, both work): a layer keeps only its input and the attention's
        softmax statistics; the backward recomputes K/V for every row and
        everything else for the kept rows only (the whole layer in ``exact`` mode)."""
        for layer in self.model.layers:
            layer.recompute = True

    def activation_checkpointing_disable(self) -> None:
        for layer in self.model.layers:
            layer.recompute = False

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(layer.recompute for layer in self.model.layers)

    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    def make_plan(self, input_ids, position_ids=None, attention_mask=None, backward="amplified",
                  layout: Layout | None = None):  # fmt: skip
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {L} exceeds the model's max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        window = self.config.sliding_window
        if window is not None and L > window:
            raise ValueError(
                f"sequence length {L} exceeds the model's sliding window ({window}); "
                "sliding-window attention is not supported"
            )
        backward = BackwardOptions.of(backward)
        backward.check_layers(self.config.num_layers)
        if layout is None:
            layout = Layout.build(B, L, input_ids.device, position_ids, attention_mask)
        elif position_ids is not None or attention_mask is not None:
            raise ValueError("give a layout or position_ids / attention_mask, not both")
        elif layout.shape != (B, L):
            raise ValueError(f"layout has shape {layout.shape}, input_ids {(B, L)}")
        path = backward.choose_path(B * L, self.config.layer_parameters(), input_ids.device.type)
        return Plan(layout, backward, path, self.config.num_layers)

    def hidden_states(
        self, input_ids: torch.Tensor, plan: Plan, final_norm: bool = True
    ) -> torch.Tensor:
        """[B, L] token ids -> [B, L, d] final hidden states (after the last norm;
        before it with ``final_norm=False``, which the fused LM head wants).
        Under tensor parallelism: this rank's rows, [N/tp, d] of the flat N = B·L."""
        if self.tp is None:
            x = self.model.embed_tokens(input_ids)
        else:  # the replicated table, looked up for this rank's rows only
            x = nn.functional.embedding(self.tp.rows(input_ids.reshape(-1)),
                                        local(self.model.embed_tokens.weight))  # fmt: skip
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        x = x.to(dtype)
        cos, sin = rope_cos_sin(plan.layout.position_ids, self.inv_freq, dtype)
        with torch.autocast(x.device.type, enabled=False):
            for layer in self.model.layers:
                x = layer(x, cos, sin, plan)
            if not final_norm:
                return x
            rows_plan = plan if self.tp is None else self.tp.local_plan(plan)
            norm_w = local(self.model.norm.weight).to(dtype)
            return rms_norm(x, norm_w, self.config.rms_norm_eps, rows_plan)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        backward: str | BackwardOptions = "amplified",
        ignore_index: int = IGNORE_INDEX,
        layout: Layout | None = None,
    ) -> CausalLMOutput:
        """input_ids, labels: [B, L] int64, labels unshifted (HF convention:
        ``labels = input_ids`` with ``ignore_index`` where no loss is wanted).
        position_ids restarting at 0 mark packed documents. Rows whose label is
        ``ignore_index`` before a labelled row of their document (a prompt) are
        context rows: no loss, and in the backward set unless ``backward`` says
        ``context="constant"`` (:func:`centrifuge.plan.context_rows`).
        backward: ``amplified`` (Centrifuge), ``exact`` (masked-loss baseline), or
        a :class:`~centrifuge.plan.BackwardOptions` that lets some gradient reach
        filtered rows (sampled rows, exact bottom layers). Pass the same options
        object every step: it holds the sampling generator. layout: the batch's
        :class:`~centrifuge.plan.Layout`, built beforehand (a captured step reads
        one at fixed addresses, :meth:`Layout.padded`), instead of position_ids."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        plan = self.make_plan(input_ids, position_ids, attention_mask, backward, layout)
        if labels is None:
            h = self.hidden_states(input_ids, plan)
            if self.tp is not None:  # every rank's rows (for inspection, without gradient)
                h = self.tp.every(input_ids.numel()).gather(h.detach()).view(*input_ids.shape, -1)
            return CausalLMOutput(None, None, plan, h)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        x = self.hidden_states(input_ids, plan, final_norm=False)
        targets = shift_targets(labels, plan.layout, ignore_index)
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), ignore_index)
        plan.valid = valid = targets != ignore_index  # the context rows derive from it
        # Final norm fused with the LM head: the backward reads the kept rows
        # once and no normalized copy of the hidden states is saved. The
        # returned ``hidden`` is for inspection (it carries no gradient).
        norm_w = local(self.model.norm.weight).to(x.dtype)
        head_w = local(self.lm_head.weight).to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if self.tp is None:
                token_loss, h = norm_linear_cross_entropy(
                    x, norm_w, head_w, targets, plan, self.config.rms_norm_eps, ignore_index
                )
            else:
                # Sequence-parallel LM head: each rank its own rows against the whole
                # vocabulary; the per-row losses are all-gathered, so that every rank
                # selects from every row's loss (the same plan everywhere).
                own_loss, h = norm_linear_cross_entropy(
                    x, norm_w, head_w, self.tp.rows(targets.reshape(-1)), self.tp.local_plan(plan),
                    self.config.rms_norm_eps, ignore_index,
                )  # fmt: skip
                token_loss = self.tp.gather_loss(own_loss).view(targets.shape)
        return CausalLMOutput(token_loss, valid, plan, h)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, **kw) -> torch.Tensor:
        """[B, L, vocab] logits in float32 (float64 for a float64 model)."""
        h = self.forward(input_ids, **kw).hidden
        logits = h @ local(self.lm_head.weight).to(h.dtype).t()
        return logits.to(torch.promote_types(h.dtype, torch.float32))

    # --- checkpoints in Hugging Face layout ----------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32):
        """Load a local HF Llama/Mistral/Qwen2/Qwen3 directory (config.json +
        *.safetensors, sharded or not), checked as :func:`checkpoint_files` does."""
        with torch.device("meta"):
            model = cls(ModelConfig.from_pretrained(path))
        state = {name: t[:] for name, t in checkpoint_parameters(path, dtype)}
        model.load_state_dict(state, strict=False, assign=True)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.reset_buffers()
        return model

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors, loadable by transformers. state_dict:
        the weights to write instead of the model's own (e.g. gathered from FSDP shards)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        give_default_mode(path / "model.safetensors")
        cfg = self.config.to_hf_dict()
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))


def init_parameter(name: str, p: torch.Tensor, std: float = 0.02) -> None:
    """The initialization of the parameter called ``name``, in place: ones for
    norm weights, zeros for biases, else N(0, std) from torch's default generator."""
    if name.endswith("norm.weight") or "layernorm" in name:
        nn.init.ones_(p)
    elif name.endswith(".bias"):
        nn.init.zeros_(p)
    else:
        nn.init.normal_(p, std=std)


def build_model(config: ModelConfig, dtype=torch.float32, device="cpu", seed: int | None = None):
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def initial_parameters(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``build_model(config, seed=seed)``'s parameters, bit for bit, one at a
    time and without building the model: (name, full float32 CPU tensor) in
    ``named_parameters()`` order (a tied embedding once). Only the tensor the
    caller holds is allocated (and, while it is drawn, one module's worth).

    The stream of torch's default generator is replayed as the construction
    draws it: first each nn.Linear's and nn.Embedding's own initialization in
    their constructors (overwritten, but it moves the generator), then
    :meth:`LlamaForCausalLM.reset_parameters`; the generator ends where
    ``build_model`` leaves it."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)  # shapes and names only: no draws
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and next(m.parameters(recurse=False), None) is not None:
            copy.deepcopy(m).to_empty(device="cpu").reset_parameters()
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype, device="cpu")
        init_parameter(name, full)
        yield name, full
        del full  # before the next one is drawn (the caller should drop its own reference)


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """{parameter name: the *.safetensors file that holds it} of a local HF
    checkpoint directory, in ``named_parameters()`` order, checked against its
    config.json from the files' headers alone (no tensor data is read): a file
    whose header cannot be read (truncated, not safetensors) raises ValueError
    naming it; missing or unexpected names, or another shape than the config's,
    raise ValueError. A tied config's ``lm_head.weight`` is ignored."""
    from safetensors import safe_open

    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    shapes, where = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    shapes[name], where[name] = tuple(sf.get_slice(name).get_shape()), f
        except Exception as e:  # safetensors raises several types on corrupt data
            raise ValueError(f"cannot read checkpoint file {f}: {e}") from e
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    with torch.device("meta"):
        expected = dict(LlamaForCausalLM(config).named_parameters())  # a tied weight once
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, p in expected.items():
        if shapes[name] != tuple(p.shape):
            raise ValueError(f"checkpoint {path} does not match its config: {name} has shape "
                             f"{list(shapes[name])}, the config gives {list(p.shape)}")  # fmt: skip
    return {name: where[name] for name in expected}


class StoredTensor:
    """One tensor of a safetensors file, read when indexed: ``t[index]`` (a
    tuple of slices, one per dimension, or ``t[:]`` for all of it) gives that
    block as a ``dtype`` CPU tensor, like indexing the whole tensor, and reads
    only the block: the file is memory-mapped, so only the pages that hold it
    are read from disk, and a cast (a ``dtype`` other than the stored one)
    copies the block alone. A file whose data cannot be read raises the
    ValueError naming it."""

    def __init__(self, file: Path, name: str, dtype: torch.dtype):
        self.file, self.name, self.dtype = file, name, dtype

    def __getitem__(self, index) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.file), framework="pt") as sf:  # a header parse per read: cheap
                return sf.get_slice(self.name)[index].to(self.dtype)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint file {self.file}: {e}") from e


def checkpoint_parameters(path: str | Path, dtype: torch.dtype = torch.float32
                          ) -> list[tuple[str, StoredTensor]]:  # fmt: skip
    """A local HF checkpoint directory's parameters, (name, :class:`StoredTensor`
    of ``dtype``) in ``named_parameters()`` order (a tied embedding once), after
    :func:`checkpoint_files` has checked the headers. Nothing is read until a
    caller indexes one: ``t[:]`` is the whole tensor, a block only its part."""
    return [(name, StoredTensor(f, name, dtype)) for name, f in checkpoint_files(path).items()]
