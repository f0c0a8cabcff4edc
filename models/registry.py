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


def model_class_for(config: Any) -> type:
    """The class for the first supported name in ``config.architectures``.

    Raises ValueError naming the architectures found and listing the supported ones.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) if names else "none (config.architectures is empty)"
    raise ValueError(
        f"unsupported model architecture: {found}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )
