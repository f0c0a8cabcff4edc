"""Qwen2 and Qwen3: the Llama decoder with different attention options.

- Qwen2: bias on q/k/v (never on o_proj).
- Qwen3: RMSNorm over ``head_dim`` on each q and k head (before RoPE); biases only when
  ``config.attention_bias`` is set.
"""
from __future__ import annotations

from typing import Any

from .llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 causal LM."""

    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense) causal LM."""

    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
