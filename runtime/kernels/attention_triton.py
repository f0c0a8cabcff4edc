"""Triton paged-attention kernels: KV-cache write here, decode and prefill in their own files.

Importing this module imports triton; ``infer.runtime.attention`` imports it lazily. Under
``TRITON_INTERPRET=1`` (set before the first import) every launcher runs on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .decode_attention_triton import decode_attention, decode_attention_with_kv_write
from .decode_plan import DecodeConfig, choose_num_splits, fuse_kv_write, plan_splits
from .kv_layout import cache_halves, cache_strides
from .prefill_attention_triton import PrefillConfig, prefill_attention
from .launch import launch

__all__ = [
    "DecodeConfig", "PrefillConfig", "choose_num_splits", "decode_attention", "decode_attention_with_kv_write",
    "fuse_kv_write", "plan_splits", "prefill_attention", "write_kv_cache",
]


# num_slots follows the batch size: not specialized, so a new batch size reuses the compiled kernel.
# The cache comes as K and V halves (kv_layout): no argument follows its block count.
@triton.jit(do_not_specialize=["num_slots"])
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cblk, stride_ctok, stride_ch,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token, mask=token < num_slots, other=-1)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM)
    mask = h[:, None] < NUM_HEADS
    dst = (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_ctok + h[:, None] * stride_ch + d[None, :]
    t = token.to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)  # [HEADS_PAD, D]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)  # [HEADS_PAD, D]
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter ``k``/``v`` ``[T, Hkv, D]`` into ``kv_cache`` ``[2, num_blocks, block_size, Hkv, D]``.

    Token ``t`` goes to ``slot_mapping[t]``; slots ``< 0`` and tokens past ``len(slot_mapping)``
    are skipped on the device (no host sync, CUDA-graph capturable).
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    launch(_write_kv_kernel, (num_tokens,))(
        k, v, *cache_halves(kv_cache), slot_mapping, slot_mapping.shape[0],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *cache_strides(kv_cache),
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_cache.shape[2], num_warps=1 if num_heads * head_dim <= 512 else 4,
    )
