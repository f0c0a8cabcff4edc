"""How a paged decode-attention launch is planned: tile knobs, split count, whether the KV write is fused.

Host-side only (the kernels are in :mod:`.decode_attention_triton` and :mod:`.decode_combine_triton`).
Every quantity depends on static shapes (batch, heads, block-table width, SM count), never on the
contents of a step, so a launch planned at capture time replays correctly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .tuning import kernel_config, sm_count  # noqa: F401 (sm_count: planned with here)


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tuning knobs of the decode kernel (tune on the GPU with benchmarks/attention_decode.py)."""

    block_n: int = 64  # KV tokens per loop iteration, gathered across pages
    num_warps: int = 4
    num_stages: int | None = None  # pipelining depth of the KV loads; None: ``plan_stages``
    programs_per_sm: int = 4  # split until num_seqs * num_kv_heads * splits reaches this * SMs
    # Shortest split once num_seqs * num_kv_heads fills the SMs: there a second split (and the
    # reduce kernel) cost more than the parallelism they add, so contexts up to this many tokens
    # take one split. Re-tune: ``python -m infer.benchmarks.attention_decode --batch 32 64 128``.
    min_split_tokens: int = 4096
    max_splits: int = 64

    def for_head_dim(self, head_dim: int) -> "DecodeConfig":
        """Halve the KV tile for head_dim 256 so the pipelined K/V stages fit in shared memory."""
        if head_dim <= 128 or self.block_n <= 32:
            return self
        return DecodeConfig(32, self.num_warps, self.num_stages, self.programs_per_sm,
                            self.min_split_tokens, self.max_splits)


def plan_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int, config: DecodeConfig
) -> tuple[int, int]:
    """``(num_splits, min_split_len)`` from static quantities only (batch, heads, table width, SMs).

    Aim for ``programs_per_sm * num_sms`` programs. While ``num_seqs * num_kv_heads`` is below the
    SM count the programs are few and latency-bound, so splits may shrink to one ``block_n`` tile;
    from there on splits stay at least ``min_split_tokens`` long (the bandwidth-bound regime).
    """
    base = max(num_seqs * num_kv_heads, 1)
    few = _few_pairs(num_seqs, num_kv_heads, num_sms)
    min_tokens = config.block_n if few else max(config.min_split_tokens, config.block_n)
    wanted = triton.cdiv(config.programs_per_sm * num_sms, base)
    by_length = triton.cdiv(max(max_context, 1), min_tokens)
    splits = max(1, min(wanted, by_length, config.max_splits))
    return splits, triton.cdiv(min_tokens, config.block_n) * config.block_n


SHORT_GRID_PROGRAMS_PER_SM = 3  # from this many split programs per SM, short splits keep per-tile table loads


def plan_stages(config: DecodeConfig, num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Software-pipelining depth of the KV loads: ``config.num_stages`` if set, else 2 for a
    latency-bound launch (fewer (sequence, kv head) pairs than SMs) and 3 otherwise.

    Short-split programs walk one or two 64-token tiles, so a deeper pipeline gains little there,
    while smaller stage buffers fit more programs per SM (and the GEMV launched early behind them).
    ``INFER_DECODE_STAGES`` forces a depth. Re-tune: ``python -m infer.benchmarks decode`` at
    batch 1-16 with ``INFER_DECODE_STAGES=2`` and ``3``.
    """
    if config.num_stages is not None:
        return config.num_stages
    if kernel_config().decode_stages is not None:
        return kernel_config().decode_stages
    return 2 if _few_pairs(num_seqs, num_kv_heads, num_sms) else 3


def table_pages(block_size: int, block_n: int) -> int:
    """The configured chunk (``KernelConfig.decode_table_pages``) where it can serve a ``block_n``
    tiling (pages that tile a tile, chunks of whole tiles), else 0."""
    pages = kernel_config().decode_table_pages
    if pages <= 0 or block_n % block_size or (pages * block_size) % block_n:
        return 0
    return pages


def plan_table(num_seqs: int, num_kv_heads: int, num_splits: int, num_sms: int, block_size: int,
               block_n: int) -> int:
    """Block-table entries the partial kernel holds in registers per chunk (0: each tile loads its
    own page ids): :func:`table_pages` for a latency-bound launch of fewer than
    ``SHORT_GRID_PROGRAMS_PER_SM`` split programs per SM, else 0.

    Triton does not pipeline a K/V load whose address comes from a load in the same loop
    iteration; with the page ids in registers it does. The compiled kernel then holds deeper
    buffers, so fewer of its programs fit on an SM: many programs are faster without it.
    ``INFER_DECODE_TABLE_PAGES=0`` turns it off. Re-tune: ``python -m infer.benchmarks decode``
    at batch 1-64 with and without it.
    """
    many_short = num_seqs * num_kv_heads * num_splits >= SHORT_GRID_PROGRAMS_PER_SM * num_sms
    if many_short or not _few_pairs(num_seqs, num_kv_heads, num_sms):
        return 0
    return table_pages(block_size, block_n)


def fuse_kv_write() -> bool:
    """Whether uniform decode steps store their k/v inside the decode kernel.

    At every batch size the write kernel's launch is saved, the first K/V tile is fetched before
    the PDL wait, and the writer stores its row before its loop, so no register substitution
    weighs on the loop. ``INFER_FUSE_KV_WRITE=0``: the two-kernel path. Re-measure:
    ``python -m infer.benchmarks.attention_decode --paths write+decode fused``.
    """
    return kernel_config().fuse_kv_write


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, config: DecodeConfig
) -> int:
    """Splits per sequence on ``device`` (see ``plan_splits``)."""
    return plan_splits(num_seqs, num_kv_heads, max_context, sm_count(device), config)[0]


def latency_bound(num_seqs: int, num_kv_heads: int, device: torch.device) -> bool:
    """Fewer (sequence, kv head) pairs than SMs: a decode launch is latency-bound (short splits,
    reduce under PDL, the combine in the partial kernel, 2 stages)."""
    return _few_pairs(num_seqs, num_kv_heads, sm_count(device))


def _few_pairs(num_seqs: int, num_kv_heads: int, num_sms: int) -> bool:
    return num_seqs * num_kv_heads < num_sms


def combine_in_partial(num_seqs: int, num_kv_heads: int, num_splits: int, device: torch.device) -> bool:
    """Whether the last split of each (sequence, kv head) to finish combines the partials itself,
    instead of a separate reduce kernel.

    Only in the latency-bound regime (fewer (sequence, kv head) pairs than SMs, i.e. batch 1-16 at
    8 kv heads), where the reduce is a whole dependent launch for a few microseconds of work. With
    many pairs the splits are long (``min_split_tokens``) and the reduce is a small share.
    ``INFER_DECODE_COMBINE=0`` keeps the reduce kernel. Re-measure:
    ``python -m infer.benchmarks.step_breakdown --shape 8b --batch 1``.
    """
    return kernel_config().decode_combine and num_splits > 1 and latency_bound(num_seqs, num_kv_heads, device)
