"""Split-K "flash-decoding" paged attention for one query token per sequence.

Grid ``(num_seqs, num_kv_heads, num_splits)``: a program takes every q head of one kv-head group
(padded to 16 rows so ``tl.dot`` runs on tensor cores), walks its slice of the sequence in
``BLOCK_N``-token tiles gathered through the block table, and keeps a running max/sum in fp32.
With more than one split it writes a partial ``(out, lse)`` and a second kernel combines them.

CUDA-graph safety: sequence lengths are read from device memory and every shape and launch
parameter depends only on ``block_tables.shape`` (never on host ``max_seq_len``), so a captured
launch replays correctly after ``seq_lens``/``block_tables`` contents change. A split that starts
past its sequence's end writes a neutral partial (``lse = -inf``); a sequence of length 0
(CUDA-graph padding) produces zeros.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tuning knobs of the decode kernel (tune on the GPU with benchmarks/attention_decode.py)."""

    block_n: int = 64  # KV tokens per loop iteration, gathered across pages
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the KV loads
    programs_per_sm: int = 4  # split until num_seqs * num_kv_heads * splits reaches this * SMs
    min_split_tokens: int = 256  # never make a split shorter than this
    max_splits: int = 64

    def for_head_dim(self, head_dim: int) -> "DecodeConfig":
        """Halve the KV tile for head_dim 256 so the pipelined K/V stages fit in shared memory."""
        if head_dim <= 128 or self.block_n <= 32:
            return self
        return DecodeConfig(32, self.num_warps, self.num_stages, self.programs_per_sm,
                            self.min_split_tokens, self.max_splits)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton interpreter on CPU: keep the grid small
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, config: DecodeConfig
) -> int:
    """Splits per sequence, from static quantities only (batch size, heads, block-table width)."""
    base = max(num_seqs * num_kv_heads, 1)
    wanted = triton.cdiv(config.programs_per_sm * _num_sms(device), base)
    by_length = triton.cdiv(max(max_context, 1), config.min_split_tokens)
    return max(1, min(wanted, by_length, config.max_splits))


@triton.jit
def _decode_partial_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2e, split_len, max_context,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ckv, stride_cblk, stride_ctok, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_context)  # never read past the table
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    q_heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + q_heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None], other=0.0)  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        t_mask = tok < end
        blk = tl.load(table + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        row = blk * stride_cblk + (tok % BLOCK_SIZE) * stride_ctok + kv_head * stride_ch  # [BLOCK_N]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)  # [BLOCK_N, D]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # [GROUP_PAD, BLOCK_N]
        qk = tl.where(t_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + stride_ckv + row[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [GROUP_PAD, D]; zeros without keys
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + q_heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # log2 domain
        part = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + q_heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_lse_ptr + part, lse, mask=g_mask)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < NUM_SPLITS
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s_mask, other=float("-inf"))  # [SPLITS_PAD]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0.0, denom, 1.0)  # [D]
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: Tensor, kv_cache: Tensor, seq_lens: Tensor, block_tables: Tensor, scale: float,
    out: Tensor | None = None, config: DecodeConfig | None = None, num_splits: int | None = None,
) -> Tensor:
    """Paged decode attention: query row ``b`` of ``q`` belongs to sequence ``b``.

    Args:
        q: ``[T, Hq, D]`` with ``T >= num_seqs``; rows past ``num_seqs`` get zeros.
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]`` already holding this step's k/v.
        seq_lens: ``[B] int32`` including the current token.
        block_tables: ``[B, max_blocks_per_seq] int32``.
        num_splits: override the heuristic (benchmarks / tests).
    Returns:
        ``[T, Hq, D]`` in q's dtype (``out`` if given).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    config = (config or DecodeConfig()).for_head_dim(head_dim)
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs, width = block_tables.shape
    if num_tokens < num_seqs:
        raise ValueError(f"decode needs one query row per sequence: q has {num_tokens} rows, {num_seqs} sequences")
    if out is None:
        out = torch.empty_like(q)  # [T, Hq, D]
    if num_tokens > num_seqs:
        out[num_seqs:].zero_()
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    max_context = width * block_size
    splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, max_context, q.device, config)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), config.block_n) * config.block_n
    splits = max(1, triton.cdiv(max_context, split_len))
    part_o = part_lse = out  # placeholders, unused when splits == 1
    if splits > 1:
        part_o = torch.empty(num_seqs, num_q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_q_heads, splits, device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_partial_kernel[(num_seqs, num_kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * LOG2E, split_len, max_context,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=config.block_n, NUM_SPLITS=splits, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out
