"""The model shapes the benchmarks build (Qwen3-shaped, random weights): ``qwen3_config(name)``."""
from __future__ import annotations

import transformers

SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, intermediate_size=256, vocab_size=512, tie_word_embeddings=True),  # CPU tests
}


def qwen3_config(shape: str) -> transformers.Qwen3Config:
    """The ``transformers.Qwen3Config`` of a named shape (see ``SHAPES``)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    return transformers.Qwen3Config(**SHAPES[shape], max_position_embeddings=40960)
