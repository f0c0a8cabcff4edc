"""Plain-torch paged attention: the ground truth, runs on any device (with host syncs)."""
from __future__ import annotations

import torch
from torch import Tensor

from .metadata import AttentionMetadata


def write_kv_reference(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter k/v into the cache at ``slot_mapping``; slots < 0 and tokens past its end are skipped.

    Args:
        k, v: ``[T, Hkv, D]``.
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]`` (mutated).
        slot_mapping: ``[>=0] int64``.
    """
    n = min(k.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n]  # [n]
    keep = slots >= 0
    slots = slots[keep]
    num_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    cache = kv_cache.view(2, -1, num_heads, head_dim)  # [2, num_blocks*block_size, Hkv, D]
    cache[0, slots] = k[:n][keep].to(kv_cache.dtype)
    cache[1, slots] = v[:n][keep].to(kv_cache.dtype)


def _gather_kv(kv_cache: Tensor, table: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Return the first ``seq_len`` cached K and V rows of one sequence, each ``[seq_len, Hkv, D]``."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = table[:num_blocks].long()  # [nb]
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # [L, Hkv, D]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]  # [L, Hkv, D]
    return k, v


def attend_reference(q: Tensor, kv_cache: Tensor, scale: float, metadata: AttentionMetadata) -> Tensor:
    """Causal attention of each query token over its sequence's cached prefix.

    Args:
        q: ``[T, Hq, D]``; tokens past ``query_start_loc[-1]`` get zero output.
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]`` already holding this step's k/v.
    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    num_q_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)  # [T, Hq, D]
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    for b in range(metadata.num_seqs):
        start, end, seq_len = starts[b], starts[b + 1], seq_lens[b]
        q_len = end - start
        if q_len <= 0 or seq_len <= 0:
            continue
        k, v = _gather_kv(kv_cache, metadata.block_tables[b], seq_len)  # [L, Hkv, D]
        k = k.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        qb = q[start:end].float()  # [Lq, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale  # [Hq, Lq, L]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [Lq]
        kv_pos = torch.arange(seq_len, device=q.device)  # [L]
        allowed = kv_pos[None, :] <= q_pos[:, None]  # [Lq, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def paged_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float, metadata: AttentionMetadata
) -> Tensor:
    """Write k/v, then attend. Shapes as in the op, 3-d: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``."""
    write_kv_reference(k, v, kv_cache, metadata.slot_mapping)
    return attend_reference(q, kv_cache, scale, metadata)
