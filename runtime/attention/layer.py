"""Attention layer: owns one layer's paged KV cache and calls the opaque paged-attention op."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import op as _op  # noqa: F401  (registers torch.ops.infer.paged_attention)

DEFAULT_BLOCK_SIZE = 16  # block size of the empty placeholder cache before bind_kv_cache


class Attention(nn.Module):
    """Causal paged attention over per-rank heads (tensor-parallel agnostic).

    ``forward`` maps q ``[T, Hq*D]``, k/v ``[T, Hkv*D]`` to ``[T, Hq*D]``; the per-step batch
    layout comes from ``infer.runtime.attention.forward_context``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None) -> None:
        super().__init__()
        if num_heads <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError(f"head counts and head_dim must be positive, got {num_heads}, {num_kv_heads}, {head_dim}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        empty = torch.empty(2, 0, DEFAULT_BLOCK_SIZE, num_kv_heads, head_dim)  # [2, 0, bs, Hkv, D]
        self.register_buffer("kv_cache", empty, persistent=False)

    def bind_kv_cache(self, cache: Tensor) -> None:
        """Use ``cache`` ``[2, num_blocks, block_size, Hkv, D]`` (a view of the engine's pool) from now on."""
        expected = (2, self.num_kv_heads, self.head_dim)
        if cache.dim() != 5 or (cache.shape[0], cache.shape[3], cache.shape[4]) != expected:
            raise ValueError(
                f"kv cache must be [2, num_blocks, block_size, {self.num_kv_heads}, {self.head_dim}], "
                f"got {tuple(cache.shape)}"
            )
        if cache.shape[2] <= 0 or cache.stride(4) != 1:
            raise ValueError(f"kv cache needs block_size > 0 and a contiguous last dim, got {tuple(cache.shape)} "
                             f"strides {cache.stride()}")
        self.kv_cache = cache

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]
        return torch.ops.infer.paged_attention(q, k, v, self.kv_cache, self.scale)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, scale={self.scale:.4g}")
