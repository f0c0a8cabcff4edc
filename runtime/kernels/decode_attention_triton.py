"""Split-K "flash-decoding" paged attention for one query token per sequence.

Grid ``(num_seqs, num_kv_heads, num_splits)``: a program takes every q head of one kv-head group
(padded to 16 rows so ``tl.dot`` runs on tensor cores), walks its slice of the sequence in
``BLOCK_N``-token tiles gathered through the block table, and keeps a running max/sum in fp32. With
more than one split it writes a partial ``(out, lse)`` and a second kernel combines them
(:mod:`.decode_combine_triton`); in the latency-bound regime (``decode_plan.combine_in_partial``:
few sequences) the last split of each (sequence, kv head) to finish combines them instead. Each
program stores its partial, then counts itself in on a per-(sequence, kv head) arrival counter (an
atomic add with acquire-release ordering, after a barrier that orders every thread's stores before
it); the program that sees the count reach the number of splits holding keys reads the partials back
(past L1) and combines them in split order, exactly as the reduce kernel does, then sets the counter
back to zero for the next launch. The counters live in a per-device buffer allocated once, outside
CUDA-graph capture; two launches running at once on different streams of one device would share
them, so that is unsupported (every launch of a step runs on one stream).

Split length is decided on the device: ``num_splits`` is fixed by shapes, and each sequence is cut
into ``num_splits`` slices of ``max(roundup(cdiv(seq_len, num_splits), BLOCK_N), min_split_len)``
tokens, so a short sequence in a wide block table still gets short splits. Splits past the end do
nothing and the reduce kernel does not read them.

``decode_attention_with_kv_write`` also stores this step's k/v, which saves the write kernel: the
program whose split covers position ``seq_len - 1`` stores the new row before its loop, and a
barrier orders that store before the loop's reads. Its first tile is peeled off the loop and takes
the new row from registers, because under PDL that tile is fetched before the wait for the
previous kernel (nothing else it reads is written during the step), while the previous kernel
finishes.

CUDA-graph safety: sequence lengths are read on the device; every shape and launch parameter
depends only on the batch size and ``block_tables.shape`` (never on host ``max_seq_len``), so a
captured launch replays correctly with new ``seq_lens``/``block_tables`` contents. A sequence of
length 0 (CUDA-graph padding) produces zeros.

Latency-bound launches of few programs (``decode_plan.plan_table``: 1-4 sequences at 8 kv heads and
context 512) hold their chunk of the block table in registers (``TABLE_PAGES``) and take each
tile's page ids from it, so the K/V gathers are software-pipelined; elsewhere each tile loads its
own page ids, which keeps the compiled kernel's buffers small and more programs on an SM.

Compile count: ints that change with the batch size (``num_splits``, ``min_split_len``,
``num_slots``) or the block-table width (``stride_bt``) are ``do_not_specialize`` runtime
arguments. What follows the batch is ``COMBINE``, ``TABLE_PAGES`` and the pipelining depth
(``decode_plan``), so capturing ~35 batch sizes compiles the partial kernel three times per
head/dtype shape (few programs, many short splits, long splits), not once per size. No argument
follows the cache's block count (:mod:`.kv_layout`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .counters import arrival_counters
from .decode_combine_triton import REDUCE_SPLITS_BLOCK, _combine_group, _decode_reduce_kernel, _split_len
from .decode_plan import (DecodeConfig, combine_in_partial, latency_bound, plan_splits, plan_stages, plan_table,
                          sm_count)
from .kv_layout import cache_halves, cache_strides
from .pdl import pdl_launch_options
from .launch import launch

LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, table, n0, end, kv_head, d, stride_cblk, stride_ctok, stride_ch,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(k, v, mask)``: the ``[BLOCK_N, D]`` K and V rows of tokens ``n0..n0+BLOCK_N`` (those below
    ``end``) of one kv head, gathered through the block table."""
    tok = n0 + tl.arange(0, BLOCK_N)
    mask = tok < end
    blk = tl.load(table + tok // BLOCK_SIZE, mask=mask, other=0)
    return _kv_rows(k_cache_ptr, v_cache_ptr, blk, tok, mask, kv_head, d, stride_cblk, stride_ctok, stride_ch,
                    BLOCK_SIZE)


@triton.jit
def _kv_tile_paged(k_cache_ptr, v_cache_ptr, pages, p0, n0, end, kv_head, d, stride_cblk, stride_ctok, stride_ch,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_kv_tile` with the page ids taken from ``pages``: the block-table entries from page
    ``p0`` on, held in registers (the tile's pages must lie among them)."""
    tok = n0 + tl.arange(0, BLOCK_N)
    mask = tok < end
    blk = tl.gather(pages, tok // BLOCK_SIZE - p0, 0)  # [BLOCK_N]
    return _kv_rows(k_cache_ptr, v_cache_ptr, blk, tok, mask, kv_head, d, stride_cblk, stride_ctok, stride_ch,
                    BLOCK_SIZE)


@triton.jit
def _kv_rows(k_cache_ptr, v_cache_ptr, blk, tok, mask, kv_head, d, stride_cblk, stride_ctok, stride_ch,
             BLOCK_SIZE: tl.constexpr):
    """``(k, v, mask)``: the K and V rows of tokens ``tok`` (where ``mask``) in pages ``blk``."""
    row = blk.to(tl.int64) * stride_cblk + (tok % BLOCK_SIZE) * stride_ctok + kv_head * stride_ch  # [BLOCK_N]
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=mask[:, None], other=0.0)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=mask[:, None], other=0.0)
    return k, v, mask


@triton.jit
def _attend_tile(q, k, v, t_mask, m_i, l_i, acc, scale_log2e, PRECISION: tl.constexpr):
    """One online-softmax step over a ``[BLOCK_N, D]`` K/V tile: the new ``(m_i, l_i, acc)``."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # [GROUP_PAD, BLOCK_N]
    qk = tl.where(t_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_splits", "min_split_len", "num_slots", "stride_bt"])
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
    part_o_ptr, part_lse_ptr, counter_ptr,
    scale_log2e, num_splits, min_split_len, max_context, num_slots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cblk, stride_ctok, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, FUSE_WRITE: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    COMBINE: tl.constexpr = False, GROUP_P2: tl.constexpr = 1, SPLITS_BLOCK: tl.constexpr = 16,
    TABLE_PAGES: tl.constexpr = 0,
):
    # With the write fused, nothing an earlier kernel of this step writes is read before the PDL wait
    # below: lengths, tables and slots come from the host, and the only cache row written this step
    # is this program's own. So the first K/V tile is fetched while the previous kernel finishes.
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if not FUSE_WRITE:
            tl.extra.cuda.gdc_wait()  # the cache may hold rows an earlier kernel just wrote
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_context)  # never read past the table
    split_len = _split_len(seq_len, num_splits, min_split_len, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    d = tl.arange(0, HEAD_DIM)
    skip = (start >= seq_len) & (num_splits > 1)  # past the end: the reduce kernel skips this split
    if FUSE_WRITE:  # this step's token sits at seq_len - 1; the split covering it stores it
        slot = tl.load(slot_ptr + seq, mask=seq < num_slots, other=-1).to(tl.int64)
        has_new = slot >= 0  # -1: padding row, nothing written and nothing substituted
        new_pos = tl.where(has_new, seq_len - 1, -1)  # -1 matches no token below
        writer = has_new & (split == tl.maximum(new_pos, 0) // split_len)  # split 0 when seq_len == 0
        w_mask = d < tl.where(writer, HEAD_DIM, 0)  # [D], all-false except in the writing program
        skip = skip & ~writer
    if COMBINE:  # an empty sequence has no split to combine: split 0 writes its zeros
        skip = skip & ~((seq_len == 0) & (split == 0))
    if skip:
        return

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k, v, t_mask = _kv_tile(k_cache_ptr, v_cache_ptr, table, start, end, kv_head, d, stride_cblk, stride_ctok,
                            stride_ch, BLOCK_SIZE, BLOCK_N)  # the first tile, peeled off the loop
    if USE_PDL:
        if FUSE_WRITE:
            tl.extra.cuda.gdc_wait()  # q and this step's k/v are written by earlier kernels

    if FUSE_WRITE:
        k_new = tl.load(k_ptr + seq.to(tl.int64) * stride_kt + kv_head * stride_kh + d, mask=w_mask, other=0.0)
        v_new = tl.load(v_ptr + seq.to(tl.int64) * stride_vt + kv_head * stride_vh + d, mask=w_mask, other=0.0)
        k_new = k_new.to(k_cache_ptr.dtype.element_ty)  # [D], exactly what the cache will hold
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)  # [D]
        dst = (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_ctok + kv_head * stride_ch + d
        tl.store(k_cache_ptr + dst, k_new, mask=w_mask)
        tl.store(v_cache_ptr + dst, v_new, mask=w_mask)
        # The loop's tiles are read after this barrier, so they see the stores above (the whole
        # program's threads are ordered by it); the first tile was read before them and takes the
        # new row from registers.
        tl.debug_barrier()
        is_new = (start + tl.arange(0, BLOCK_N) == new_pos)[:, None]  # [BLOCK_N, 1]
        k = tl.where(is_new, k_new[None, :], k)
        v = tl.where(is_new, v_new[None, :], v)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    q_heads = kv_head * GROUP + g
    if COMBINE:
        if seq_len == 0:
            zeros = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            tl.store(out_ptr + seq.to(tl.int64) * stride_ot + q_heads[:, None] * stride_oh + d[None, :],
                     zeros.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
            return
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + q_heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None], other=0.0)  # [GROUP_PAD, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if start < end:
        m_i, l_i, acc = _attend_tile(q, k, v, t_mask, m_i, l_i, acc, scale_log2e, PRECISION)
    if TABLE_PAGES > 0:  # the block-table chunk sits in registers: the tile loads can be pipelined
        pi = tl.arange(0, TABLE_PAGES)
        end_page = tl.cdiv(end, BLOCK_SIZE)
        for c0 in range(start + BLOCK_N, end, TABLE_PAGES * BLOCK_SIZE):  # page-aligned: BLOCK_SIZE | BLOCK_N
            p0 = c0 // BLOCK_SIZE
            pages = tl.load(table + p0 + pi, mask=p0 + pi < end_page, other=0)  # [TABLE_PAGES]
            for n0 in range(c0, tl.minimum(end, c0 + TABLE_PAGES * BLOCK_SIZE), BLOCK_N):
                k_n, v_n, mask_n = _kv_tile_paged(k_cache_ptr, v_cache_ptr, pages, p0, n0, end, kv_head, d,
                                                  stride_cblk, stride_ctok, stride_ch, BLOCK_SIZE, BLOCK_N)
                m_i, l_i, acc = _attend_tile(q, k_n, v_n, mask_n, m_i, l_i, acc, scale_log2e, PRECISION)
    else:
        for n0 in range(start + BLOCK_N, end, BLOCK_N):  # names of their own: nothing else is loop-carried
            k_n, v_n, mask_n = _kv_tile(k_cache_ptr, v_cache_ptr, table, n0, end, kv_head, d, stride_cblk,
                                        stride_ctok, stride_ch, BLOCK_SIZE, BLOCK_N)
            m_i, l_i, acc = _attend_tile(q, k_n, v_n, mask_n, m_i, l_i, acc, scale_log2e, PRECISION)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [GROUP_PAD, D]; zeros without keys
    if num_splits == 1:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + q_heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # log2 domain
        part = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + q_heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_lse_ptr + part, lse, mask=g_mask)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
        if COMBINE:
            tl.debug_barrier()  # every thread's partial stores come before the count below
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            num_active = tl.cdiv(seq_len, split_len)  # splits with keys: the ones that count
            if arrived == num_active - 1:  # the last one in: every other partial is visible
                tl.store(counter, 0)  # ready for the next launch
                _combine_group(part_o_ptr, part_lse_ptr, out_ptr, seq, kv_head, num_splits, num_active,
                               tl.num_programs(1) * GROUP, stride_ot, stride_oh, GROUP, GROUP_P2, HEAD_DIM,
                               SPLITS_BLOCK)


def _check_decode_shapes(q: Tensor, kv_cache: Tensor, block_tables: Tensor) -> None:
    if q.dim() != 3 or kv_cache.dim() != 5 or q.shape[2] != kv_cache.shape[4]:
        raise ValueError(f"need q [T, Hq, D] and kv_cache [2, num_blocks, block_size, Hkv, D], "
                         f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    if q.shape[1] % kv_cache.shape[3] != 0:
        raise ValueError(f"num_q_heads={q.shape[1]} is not a multiple of num_kv_heads={kv_cache.shape[3]}")
    if q.shape[0] < block_tables.shape[0]:
        raise ValueError(f"decode needs one query row per sequence: q has {q.shape[0]} rows, "
                         f"{block_tables.shape[0]} sequences")


def _launch(
    q: Tensor, kv_cache: Tensor, seq_lens: Tensor, block_tables: Tensor, scale: float, out: Tensor | None,
    config: DecodeConfig | None, num_splits: int | None, new_kv: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """Run the partial (+ reduce) kernels; ``new_kv = (k, v, slot_mapping)`` fuses the cache write."""
    _check_decode_shapes(q, kv_cache, block_tables)
    num_tokens, num_q_heads, head_dim = q.shape
    config = (config or DecodeConfig()).for_head_dim(head_dim)
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs, width = block_tables.shape
    if out is None:
        out = torch.empty_like(q)  # [T, Hq, D]
    if num_tokens > num_seqs:
        out[num_seqs:].zero_()
    if num_seqs == 0:
        return out
    max_context = width * block_size
    num_sms = sm_count(q.device)
    splits, min_split_len = plan_splits(num_seqs, num_kv_heads, max_context, num_sms, config)
    if num_splits is not None:  # forced: an even share of each sequence, at least one tile
        splits, min_split_len = max(1, num_splits), config.block_n
    part_o = part_lse = out  # placeholders, unused when splits == 1
    if splits > 1:
        part_o = torch.empty(num_seqs, num_q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_q_heads, splits, device=q.device, dtype=torch.float32)
    k, v, slots = new_kv if new_kv is not None else (q, q, seq_lens)  # placeholders, unused without the write
    counters = None
    if combine_in_partial(num_seqs, num_kv_heads, splits, q.device):
        counters = arrival_counters(q.device, num_seqs * num_kv_heads)  # None while capturing a new size
    # The partial kernel always launches with PDL (its set-up and first tile overlap the previous
    # kernel); the reduce kernel only in the latency-bound regime: with many programs an
    # early-scheduled reduce takes SM slots from the partial kernel.
    pdl = pdl_launch_options(q.device)
    pdl_reduce = pdl_launch_options(q.device, enable=latency_bound(num_seqs, num_kv_heads, q.device))
    launch(_decode_partial_kernel, (num_seqs, num_kv_heads, splits))(
        q, k, v, *cache_halves(kv_cache), slots, block_tables, seq_lens, out, part_o, part_lse,
        counters if counters is not None else seq_lens, scale * LOG2E, splits, min_split_len, max_context,
        slots.shape[0],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *cache_strides(kv_cache), block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, GROUP_PAD=max(16, triton.next_power_of_2(num_q_heads // num_kv_heads)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, FUSE_WRITE=new_kv is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", COMBINE=counters is not None,
        GROUP_P2=triton.next_power_of_2(num_q_heads // num_kv_heads), SPLITS_BLOCK=REDUCE_SPLITS_BLOCK,
        TABLE_PAGES=plan_table(num_seqs, num_kv_heads, splits, num_sms, block_size, config.block_n),
        num_warps=config.num_warps, num_stages=plan_stages(config, num_seqs, num_kv_heads, num_sms),
        **pdl,
    )
    if splits > 1 and counters is None:
        launch(_decode_reduce_kernel, (num_seqs, num_q_heads))(
            part_o, part_lse, seq_lens, out, splits, min_split_len, max_context, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_N=config.block_n, SPLITS_BLOCK=REDUCE_SPLITS_BLOCK, num_warps=4, **pdl_reduce,
        )
    return out


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
    return _launch(q, kv_cache, seq_lens, block_tables, scale, out, config, num_splits, None)


def decode_attention_with_kv_write(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor, seq_lens: Tensor,
    block_tables: Tensor, scale: float, out: Tensor | None = None, config: DecodeConfig | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """``write_kv_cache(k, v, kv_cache, slot_mapping)`` then ``decode_attention(...)``, in one kernel.

    Sequence ``b``'s query sits at position ``seq_lens[b] - 1``, and ``slot_mapping[b]`` must be the
    cache slot of that position in ``block_tables[b]``, read by no other sequence of the batch (the
    programs write and read in no fixed order). A slot ``< 0`` (or a row past the end of
    ``slot_mapping``) is a padding row: nothing is written; with ``seq_lens[b] == 0`` it gives zeros.

    Args:
        q: ``[B, Hq, D]``, one row per sequence.
        k, v: ``[B, Hkv, D]``, this step's key/value of each sequence.
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]`` (mutated).
        slot_mapping: ``[<=B]`` cache slot of each row.
        seq_lens, block_tables, num_splits: as in ``decode_attention``.
    Returns:
        ``[B, Hq, D]`` in q's dtype (``out`` if given).
    """
    num_seqs = block_tables.shape[0]
    expected = (num_seqs, kv_cache.shape[3], kv_cache.shape[4])
    if q.shape[0] != num_seqs or k.shape != expected or v.shape != expected:
        raise ValueError(f"fused decode needs q [B={num_seqs}, Hq, D] and k/v {list(expected)}, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-d, got shape {tuple(slot_mapping.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous along head_dim")
    return _launch(q, kv_cache, seq_lens, block_tables, scale, out, config, num_splits, (k, v, slot_mapping))
