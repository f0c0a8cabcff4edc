"""Map a Hugging Face ``config.architectures`` name to the model class that implements it."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .llama import LlamaForCausalLM
from .qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

ARCHITECTURES: Mapping[str, type] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }
)


MODEL_TYPES: Mapping[str, type] = MappingProxyType(  # for a config.json without "architectures"
    {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
)


def model_class_for(config: Any) -> type:
    """The class for the first supported name in ``config.architectures``; a config without
    architectures (transformers accepts one with only ``model_type``) goes by its ``model_type``.

    Raises ValueError naming the architectures (or model type) found and listing the supported ones.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(config, "model_type", None)
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = ", ".join(names) if names else f"none in config.architectures, model_type {model_type!r}"
    raise ValueError(
        f"unsupported model architecture: {found}; supported: {', '.join(sorted(ARCHITECTURES))} "
        f"(model types {', '.join(sorted(MODEL_TYPES))})"
    )
