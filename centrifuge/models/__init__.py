from centrifuge.models.config import PRESETS, ModelConfig, get_preset
from centrifuge.models.llama import CausalLMOutput, LlamaForCausalLM, build_model

__all__ = ["PRESETS", "ModelConfig", "get_preset", "CausalLMOutput", "LlamaForCausalLM", "build_model"]
