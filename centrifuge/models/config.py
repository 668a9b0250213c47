"""Llama-family model configurations and presets with published shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral v0.1; longer sequences are refused
    family: str = "llama"
    extra: dict = field(default_factory=dict)  # HF config keys kept for saving

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; supported: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (projections and norms)."""
        d, f = self.hidden_size, self.intermediate_size
        qkv = d * self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        return qkv + self.num_heads * self.head_dim * d + 3 * d * f + 2 * d

    def num_parameters(self) -> int:
        d, v = self.hidden_size, self.vocab_size
        return self.num_layers * self.layer_parameters() + v * d * (1 if self.tie_word_embeddings else 2) + d

    # --- Hugging Face config.json -------------------------------------------
    _HF_ARCH = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }

    def to_hf_dict(self) -> dict:
        out = dict(self.extra)
        out.update(
            architectures=[self._HF_ARCH[self.family]],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
        )
        if self.family != "llama":
            out.update(sliding_window=self.sliding_window,
                       use_sliding_window=self.sliding_window is not None)
        if self.family == "llama":
            out["attention_bias"] = self.attention_bias
        return out

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        family = cfg.get("model_type", "llama")
        if family not in FAMILIES:
            raise ValueError(
                f"model_type {family!r} is not supported; Centrifuge supports {FAMILIES}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu is)")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        if rope is not None and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        heads = cfg["num_attention_heads"]
        known = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
            "tie_word_embeddings", "max_position_embeddings", "attention_bias", "hidden_act",
            "sliding_window", "use_sliding_window",
        }  # fmt: skip
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=rope,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", family == "qwen2"),
            qk_norm=family == "qwen3",
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            sliding_window=cfg.get("sliding_window")
            if cfg.get("use_sliding_window", family == "mistral") else None,
            family=family,
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face model directory")
        return cls.from_hf_dict(json.loads(file.read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)  # fmt: skip

PRESETS: dict[str, ModelConfig] = {
    # Published shapes (the models' config.json on the hub).
    "tinyllama-1.1b": ModelConfig(32000, 2048, 5632, 22, 32, 4, rope_theta=10000.0,
                                  rms_norm_eps=1e-5, max_position_embeddings=2048),
    "llama3.2-1b": ModelConfig(128256, 2048, 8192, 16, 32, 8, head_dim=64, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5,
                               tie_word_embeddings=True, max_position_embeddings=131072),
    "llama3.2-3b": ModelConfig(128256, 3072, 8192, 28, 24, 8, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-5,
                               tie_word_embeddings=True, max_position_embeddings=131072),
    "llama3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), rms_norm_eps=1e-5,
                               max_position_embeddings=131072),
    "llama3-70b": ModelConfig(128256, 8192, 28672, 80, 64, 8, rope_theta=500000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama3.1-70b": ModelConfig(128256, 8192, 28672, 80, 64, 8, rope_theta=500000.0,
                                rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), rms_norm_eps=1e-5,
                                max_position_embeddings=131072),
    "qwen2.5-1.5b": ModelConfig(151936, 1536, 8960, 28, 12, 2, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                                max_position_embeddings=32768, family="qwen2"),
    "qwen2.5-3b": ModelConfig(151936, 2048, 11008, 36, 16, 2, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                              max_position_embeddings=32768, family="qwen2"),
    "qwen3-0.6b": ModelConfig(151936, 1024, 3072, 28, 16, 8, head_dim=128, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
                              max_position_embeddings=40960, family="qwen3"),
    "mistral-7b": ModelConfig(32768, 4096, 14336, 32, 32, 8, rope_theta=1000000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=32768, family="mistral"),
    # Tiny test and CPU presets (random init).
    "tiny": ModelConfig(512, 64, 176, 2, 4, 4, max_position_embeddings=1024),
    "tiny-gqa": ModelConfig(512, 64, 176, 2, 4, 2, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0,
                            original_max_position_embeddings=64), max_position_embeddings=1024),
    "tiny-qwen2": ModelConfig(512, 64, 176, 2, 4, 2, attention_bias=True, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, max_position_embeddings=1024,
                              family="qwen2"),
    "tiny-qwen3": ModelConfig(512, 64, 176, 2, 4, 2, head_dim=32, qk_norm=True,
                              rms_norm_eps=1e-6, tie_word_embeddings=True,
                              max_position_embeddings=1024, family="qwen3"),
    "small": ModelConfig(4096, 256, 688, 4, 8, 4, max_position_embeddings=2048),
    "mini": ModelConfig(258, 128, 352, 4, 4, 4, max_position_embeddings=1024),  # centrifuge train's default (byte vocabulary)
    # GPT-2-small class (12 layers, d = 768, 114M parameters) on the byte vocabulary: the
    # utility experiment's continued-training setting (docs/utility.md).
    "byte-110m": ModelConfig(258, 768, 3072, 12, 12, 12, max_position_embeddings=2048),
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    from copy import deepcopy

    return deepcopy(PRESETS[name])
