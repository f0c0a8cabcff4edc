"""Adapter to the ``flash_attn`` package's paged kernels.

UNRUN: flash_attn cannot be installed on the development machine, so this path has never been
executed; the op only selects it on CUDA when ``flash_attn`` imports. flash-attn 2 requires the
page size to be a multiple of 256 (``supports_block_size``); the op falls back to Triton otherwise.
The cache write is done by the Triton write kernel before these calls.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from .metadata import AttentionMetadata

FLASH_PAGE_MULTIPLE = 256


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def supports_block_size(block_size: int) -> bool:
    return block_size % FLASH_PAGE_MULTIPLE == 0


def attend_flash(q: Tensor, kv_cache: Tensor, scale: float, metadata: AttentionMetadata) -> Tensor:
    """Causal paged attention through flash_attn. q ``[T, Hq, D]`` -> ``[T, Hq, D]``."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, Hkv, D]
    num_seqs = metadata.num_seqs
    if metadata.is_uniform_decode:
        out = torch.zeros_like(q)  # [T, Hq, D]; padding rows past num_seqs stay zero
        out[:num_seqs] = flash_attn_with_kvcache(
            q[:num_seqs].unsqueeze(1), k_cache, v_cache,  # [B, 1, Hq, D]
            cache_seqlens=metadata.seq_lens, block_table=metadata.block_tables,
            softmax_scale=scale, causal=True,
        ).squeeze(1)
        return out
    cu_seqlens_k = torch.zeros(num_seqs + 1, dtype=torch.int32, device=q.device)  # [B+1]
    torch.cumsum(metadata.seq_lens, 0, out=cu_seqlens_k[1:])
    out = torch.zeros_like(q)  # [T, Hq, D]
    num_tokens = metadata.num_tokens if metadata.num_tokens is not None else int(metadata.query_start_loc[-1])
    out[:num_tokens] = flash_attn_varlen_func(
        q[:num_tokens], k_cache, v_cache,
        cu_seqlens_q=metadata.query_start_loc, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=metadata.max_query_len, max_seqlen_k=metadata.max_seq_len,
        softmax_scale=scale, causal=True, block_table=metadata.block_tables,
    )
    return out
