"""Centrifuge: token-filtered LLM training whose backward runs on kept tokens only."""

from centrifuge.integrations import filtered_loss, patch, selective_loss, unpatch
from centrifuge.models import LlamaForCausalLM, ModelConfig, build_model, get_preset
from centrifuge.plan import BackwardOptions, Layout, Plan
from centrifuge.selection import Selector, keep_from_mask

__version__ = "0.1.0"

__all__ = [
    "LlamaForCausalLM", "ModelConfig", "build_model", "get_preset",
    "BackwardOptions", "Layout", "Plan", "Selector", "keep_from_mask",
]  # fmt: skip
__all__ += ["patch", "unpatch", "filtered_loss", "selective_loss"]  # HF integration


def __getattr__(name):
    """CentrifugeTrainer and CentrifugeSFTTrainer, imported on demand: they need
    transformers and accelerate (and trl), which are optional (not in __all__)."""
    if name == "CentrifugeTrainer":
        from centrifuge.integrations.trainer import CentrifugeTrainer

        return CentrifugeTrainer
    if name == "CentrifugeSFTTrainer":
        from centrifuge.integrations.trl import CentrifugeSFTTrainer

        return CentrifugeSFTTrainer
    raise AttributeError(f"module 'centrifuge' has no attribute {name!r}")
