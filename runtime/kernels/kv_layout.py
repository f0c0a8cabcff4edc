"""How the Triton kernels receive a paged KV cache ``[2, num_blocks, block_size, Hkv, D]``.

The K and V halves go as two pointers, with the strides of one block, one token and one head. No
launch argument follows the block count: the distance between the halves (``kv_cache.stride(0)``)
grows with it, and Triton types an int past 2**31 as i64, a kernel variant of its own, which the
startup profile run (on its small temporary cache) would never name for the compile pool.
"""
from __future__ import annotations

from torch import Tensor


def cache_halves(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """``(K, V)`` views ``[num_blocks, block_size, Hkv, D]`` of ``kv_cache``."""
    return kv_cache[0], kv_cache[1]


def cache_strides(kv_cache: Tensor) -> tuple[int, int, int]:
    """Elements between consecutive blocks, tokens of a block, and heads of a token."""
    return kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)
