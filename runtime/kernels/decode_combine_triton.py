"""Combining the split partials of :mod:`.decode_attention_triton`.

Each split of a (sequence, q head) leaves a partial output normalized by its own softmax sum and
that sum's log (base 2, ``lse``). The combine weights each partial by ``exp2(lse - max lse)`` and
walks the splits in order, ``SPLITS_BLOCK`` at a time, so the result does not depend on which
program finished first. Two callers:

- ``_decode_reduce_kernel``: a second launch, one program per (sequence, q head);
- ``_combine_group``: inlined in the partial kernel, run by the last split of a (sequence, kv head)
  to arrive (``decode_plan.combine_in_partial``: the latency-bound regime).

Only splits holding keys count: ``_split_len`` is the split length both the partial kernel and
the reduce derive on the device from ``seq_len``.
"""
from __future__ import annotations

import triton
import triton.language as tl

REDUCE_SPLITS_BLOCK = 16  # partials combined per reduce iteration (fixed: no recompile per batch size)


@triton.jit
def _split_len(seq_len, num_splits, min_split_len, BLOCK_N: tl.constexpr):
    """Tokens per split of one sequence: an even share rounded up to BLOCK_N, at least min_split_len."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, min_split_len)


@triton.jit
def _combine_group(part_o_ptr, part_lse_ptr, out_ptr, seq, kv_head, num_splits, num_active, num_q_heads,
                   stride_ot, stride_oh, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                   SPLITS_BLOCK: tl.constexpr):
    """The reduce kernel's combine for the ``GROUP`` q heads of one kv head, in the partial kernel.

    Partials are loaded with ``.cg`` (from L2): other programs wrote them after this SM may have
    cached those addresses in L1 during an earlier launch."""
    g = tl.arange(0, GROUP_P2)
    g_mask = g < GROUP
    d = tl.arange(0, HEAD_DIM)
    base = (seq.to(tl.int64) * num_q_heads + kv_head * GROUP + g) * num_splits  # [GP2]
    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    for s0 in range(0, num_active, SPLITS_BLOCK):
        s = s0 + tl.arange(0, SPLITS_BLOCK)
        mask = g_mask[:, None] & (s < num_active)[None, :]  # [GP2, SB]
        idx = base[:, None] + s[None, :]  # [GP2, SB]
        lse = tl.load(part_lse_ptr + idx, mask=mask, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))  # finite for real heads: every active split holds keys
        m_safe = tl.where(g_mask, m_new, 0.0)  # padded heads stay at -inf: keep their arithmetic finite
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe[:, None])  # [GP2, SB], 0 for masked lanes
        o = tl.load(part_o_ptr + idx[:, :, None] * HEAD_DIM + d[None, None, :], mask=mask[:, :, None], other=0.0,
                    cache_modifier=".cg")  # [GP2, SB, D]
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        denom = denom * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]  # [GP2, D]
    heads = kv_head * GROUP + g
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit(do_not_specialize=["num_splits", "min_split_len"])
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, num_splits, min_split_len, max_context, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_context)
    num_active = tl.cdiv(seq_len, _split_len(seq_len, num_splits, min_split_len, BLOCK_N))  # splits with keys
    d = tl.arange(0, HEAD_DIM)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_active, SPLITS_BLOCK):  # online combine, SPLITS_BLOCK partials at a time
        s = s0 + tl.arange(0, SPLITS_BLOCK)
        s_mask = s < num_active
        lse = tl.load(part_lse_ptr + base + s, mask=s_mask, other=float("-inf"))  # [SPLITS_BLOCK]
        m_new = tl.maximum(m, tl.max(lse, 0))  # finite: every active split holds keys
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # 0 for masked lanes
        o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)  # [D]
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(denom > 0.0, denom, 1.0)  # [D]; zeros for an empty sequence
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))
