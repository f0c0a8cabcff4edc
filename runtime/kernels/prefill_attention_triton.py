"""Paged varlen prefill attention (also serves mixed prefill/decode batches).

Grid ``(cdiv(max_query_len, BLOCK_M), num_seqs, num_q_heads)``: a program loads ``BLOCK_M``
query rows of one sequence and head, loops over the sequence's KV in ``BLOCK_N``-token tiles
gathered through the block table (any ``BLOCK_N``, independent of the page size), applies the
causal mask by absolute position and accumulates an online softmax in fp32. Query row ``i`` of
sequence ``b`` sits at position ``seq_len_b - query_len_b + i``, so cached prefixes work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kv_layout import cache_halves, cache_strides
from .launch import launch

LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """Tuning knobs of the prefill kernel; ``block_n`` shrinks for head_dim 256 (shared memory).

    Defaults: the best of a 24-config sweep on the H100 (``python -m infer.benchmarks.prefill_attention``,
    16 prompts of 1024 tokens, Qwen3-0.6B heads): 264 us per layer, 261 TFLOP/s."""

    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def for_head_dim(self, head_dim: int) -> "PrefillConfig":
        if head_dim <= 128:
            return self
        return PrefillConfig(self.block_m, min(self.block_n, 32), max(self.num_warps, 8), 1)


@triton.jit
def _prefill_tile(q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head, d, m_i, l_i, acc, scale_log2e,
                  stride_cblk, stride_ctok, stride_ch, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys ``n0..n0+BLOCK_N``: the new ``(m_i, l_i, acc)``.
    ``MASKED``: the tile may cross the causal diagonal or ``kv_end``; else every key is visible."""
    tok = n0 + tl.arange(0, BLOCK_N)
    t_mask = tok < kv_end
    if MASKED:
        blk = tl.load(table + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    else:
        blk = tl.load(table + tok // BLOCK_SIZE).to(tl.int64)
    row = blk * stride_cblk + (tok % BLOCK_SIZE) * stride_ctok + kv_head * stride_ch  # [BLOCK_N]
    if MASKED:
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)  # [BLOCK_N, D]
    else:
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :])
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # [BLOCK_M, BLOCK_N]
    if MASKED:
        allowed = (tok[None, :] <= q_pos[:, None]) & t_mask[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = m_new  # finite: every row sees every key of this tile
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# Not specialized: the token count and the block-table width change from step to step. The cache
# comes as K and V halves (kv_layout): no argument follows its block count.
@triton.jit(do_not_specialize=["num_tokens", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale_log2e, num_tokens,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cblk, stride_ctok, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    d = tl.arange(0, HEAD_DIM)
    if seq == tl.num_programs(1) - 1:  # the row of programs past the last sequence zero the padding rows
        step = tl.num_programs(0) * BLOCK_M
        for r0 in range(tl.load(query_start_ptr + seq) + m_block * BLOCK_M, num_tokens, step):
            r = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            zeros = tl.zeros([BLOCK_M, HEAD_DIM], out_ptr.dtype.element_ty)
            tl.store(out_ptr + r[:, None] * stride_ot + head * stride_oh + d[None, :], zeros,
                     mask=(r < num_tokens)[:, None])
        return
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the first query row

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < q_len
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None], other=0.0)  # [BLOCK_M, D]
    q_pos = context + m  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_head = head // GROUP
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)  # past the tile's last query
    # Tiles whose every key precedes every query row of this block need no mask: they run first,
    # in a loop without the causal and bounds masks; the tiles across the diagonal follow.
    full_end = (tl.minimum(context + m_block * BLOCK_M + 1, kv_end) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head, d, m_i, l_i,
                                      acc, scale_log2e, stride_cblk, stride_ctok, stride_ch,
                                      BLOCK_SIZE, BLOCK_N, PRECISION, False)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, q_pos, n0, kv_end, table, k_cache_ptr, v_cache_ptr, kv_head, d, m_i, l_i,
                                      acc, scale_log2e, stride_cblk, stride_ctok, stride_ch,
                                      BLOCK_SIZE, BLOCK_N, PRECISION, True)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def prefill_attention(
    q: Tensor, kv_cache: Tensor, query_start_loc: Tensor, seq_lens: Tensor, block_tables: Tensor,
    max_query_len: int, scale: float, out: Tensor | None = None, config: PrefillConfig | None = None,
) -> Tensor:
    """Paged varlen causal attention over each sequence's cached prefix plus its new tokens.

    Args:
        q: ``[T, Hq, D]``; rows past ``query_start_loc[-1]`` get zeros.
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]`` already holding this step's k/v.
        query_start_loc: ``[B+1] int32``; seq_lens ``[B] int32``; block_tables ``[B, W] int32``.
        max_query_len: host-side upper bound of the query lengths (sizes the grid).
    Returns:
        ``[T, Hq, D]`` in q's dtype (``out`` if given).
    """
    config = (config or PrefillConfig()).for_head_dim(q.shape[2])
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out  # [T, Hq, D]
    if num_tokens == 0:
        return out
    if num_seqs == 0 or max_query_len <= 0:
        return out.zero_()
    # grid row num_seqs: programs that zero the padding rows past query_start_loc[-1] (known on the device)
    grid = (triton.cdiv(max_query_len, config.block_m), num_seqs + 1, num_q_heads)
    launch(_prefill_kernel, grid)(
        q, *cache_halves(kv_cache), out, block_tables, seq_lens, query_start_loc, scale * LOG2E, num_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache_strides(kv_cache), block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
