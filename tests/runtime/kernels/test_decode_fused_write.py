"""Fused KV write + split-K decode vs ``write_kv_cache`` + ``decode_attention`` vs plain torch; split plan."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from infer.runtime.kernels.tuning import KernelConfig, use_kernel_config
from infer.runtime.attention.reference import attend_reference, write_kv_reference  # noqa: E402
from tests.runtime.attention.test_paged_attention import make_batch  # noqa: E402  (shared batch builder)

triton = pytest.importorskip("triton")
from infer.runtime.kernels import attention_triton as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SAME = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-3, atol=1e-3)  # interpreter: bit-identical
CONFIG = kernels.DecodeConfig(block_n=16)  # tiny tiles keep the interpreter fast
H100_SMS = 132

# name -> (seq_lens, one query token each; block-table width or None). Pages of 16 tokens.
LENGTHS = {
    "length_1": ([1], None),
    "split_and_page_ends": ([16, 32, 48, 17], None),  # with 3 splits: 48 ends a 16-token split, 17 opens one
    "mid_page": ([7, 40, 25], None),
    "wide_table": ([40], 8),  # table covers 128 tokens: the heuristic's trailing splits stay empty
}


def run_both(batch, scale, num_splits, slot_mapping=None):
    """(fused out, fused cache, two-kernel out, two-kernel cache), each on its own copy of the cache."""
    md = batch.md
    slots = md.slot_mapping if slot_mapping is None else slot_mapping
    fused_cache, split_cache = batch.cache.clone(), batch.cache.clone()
    fused = kernels.decode_attention_with_kv_write(batch.q, batch.k, batch.v, fused_cache, slots, md.seq_lens,
                                                   md.block_tables, scale, config=CONFIG, num_splits=num_splits)
    kernels.write_kv_cache(batch.k, batch.v, split_cache, slots)
    two = kernels.decode_attention(batch.q, split_cache, md.seq_lens, md.block_tables, scale, config=CONFIG,
                                   num_splits=num_splits)
    return fused, fused_cache, two, split_cache


def reference(batch, scale, slot_mapping=None):
    """Plain-torch write + attend on a copy of the cache: (out, cache)."""
    cache = batch.cache.clone()
    write_kv_reference(batch.k, batch.v, cache, batch.md.slot_mapping if slot_mapping is None else slot_mapping)
    return attend_reference(batch.q, cache, scale, batch.md), cache


def check(batch, scale, num_splits, rtol, slot_mapping=None):
    """Cache and output equal to the two-kernel path; cache equal to and output close to plain torch."""
    fused, fused_cache, two, split_cache = run_both(batch, scale, num_splits, slot_mapping)
    torch.testing.assert_close(fused_cache, split_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(fused, two, **SAME)
    ref, ref_cache = reference(batch, scale, slot_mapping)
    torch.testing.assert_close(fused_cache, ref_cache, equal_nan=True, rtol=0, atol=0)
    if not (DEVICE == "cpu" and batch.q.dtype == torch.bfloat16):  # interpreter tl.dot reads bf16 bits as ints
        torch.testing.assert_close(fused, ref, rtol=rtol, atol=rtol)
    return fused


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("name", sorted(LENGTHS))
def test_fused_matches_two_kernels_and_reference(name, num_splits):
    seq_lens, width = LENGTHS[name]
    batch = make_batch([1] * len(seq_lens), seq_lens, 4, 2, 64, 16, device=DEVICE, width=width)
    check(batch, 0.125, num_splits, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_fused_gqa_head_dim_dtype(group, head_dim, dtype):
    batch = make_batch([1] * 3, [33, 9, 16], 2 * group, 2, head_dim, 16, dtype=dtype, device=DEVICE, seed=3)
    check(batch, head_dim**-0.5, 2, rtol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("padding", ["slot_-1", "short_slot_mapping", "empty_with_slot"])
def test_fused_padding_rows(padding, num_splits):
    """Rows 1 and 3 have seq_len 0 (CUDA-graph padding) among real rows: zero output.

    ``slot_-1``/``short_slot_mapping``: nothing is written (a missing slot counts as -1).
    ``empty_with_slot``: the slot is still valid, so k/v are written as ``write_kv_cache`` would.
    """
    batch = make_batch([1] * 4, [20, 5, 33, 9], 4, 2, 64, 16, device=DEVICE, seed=5)
    batch.md.seq_lens[[1, 3]] = 0
    if padding != "empty_with_slot":
        batch.md.slot_mapping[[1, 3]] = -1
    slots = batch.md.slot_mapping[:3] if padding == "short_slot_mapping" else None
    out = check(batch, 0.125, num_splits, rtol=1e-4, slot_mapping=slots)
    assert out[[1, 3]].abs().max() == 0


def test_fused_rejects_bad_shapes():
    batch = make_batch([1, 1], [5, 9], 4, 2, 64, 16)
    md = batch.md
    with pytest.raises(ValueError, match="fused decode needs"):
        kernels.decode_attention_with_kv_write(batch.q[:1], batch.k, batch.v, batch.cache, md.slot_mapping,
                                               md.seq_lens, md.block_tables, 0.125)
    with pytest.raises(ValueError, match="fused decode needs"):
        kernels.decode_attention_with_kv_write(batch.q, batch.k[:, :1], batch.v, batch.cache, md.slot_mapping,
                                               md.seq_lens, md.block_tables, 0.125)
    with pytest.raises(ValueError, match="slot_mapping must be 1-d"):
        kernels.decode_attention_with_kv_write(batch.q, batch.k, batch.v, batch.cache, md.slot_mapping[None],
                                               md.seq_lens, md.block_tables, 0.125)


def tokens_per_split(seq_len, num_splits, min_split_len, block_n):
    """What one program of the partial kernel walks (mirrors ``_split_len``)."""
    share = triton.cdiv(triton.cdiv(seq_len, num_splits), block_n) * block_n
    return max(share, min_split_len)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("width", [32, 256, 2560])  # max_model_len 512, 4096, 40960 at 16-token pages
def test_small_batch_gets_short_splits(batch_size, width):
    config = kernels.DecodeConfig()
    splits, min_len = kernels.plan_splits(batch_size, 8, width * 16, H100_SMS, config)
    assert min_len == config.block_n
    assert tokens_per_split(512, splits, min_len, config.block_n) <= 2 * config.block_n  # context 512
    assert batch_size * 8 * triton.cdiv(512, tokens_per_split(512, splits, min_len, config.block_n)) >= 64


@pytest.mark.parametrize("batch_size", [17, 64, 256])
@pytest.mark.parametrize("width", [32, 128, 256])
def test_large_batch_keeps_old_split_choice(batch_size, width):
    config = kernels.DecodeConfig()
    max_context = width * 16
    old = max(1, min(triton.cdiv(config.programs_per_sm * H100_SMS, batch_size * 8),
                     triton.cdiv(max_context, config.min_split_tokens), config.max_splits))
    assert kernels.plan_splits(batch_size, 8, max_context, H100_SMS, config) == (old, config.min_split_tokens)
    assert kernels.choose_num_splits(batch_size, 8, max_context, torch.device("cpu"), config) >= 1


# ---- the combine in the partial kernel (no reduce launch) ----

from infer.runtime.kernels import decode_attention_triton as decode_kernels  # noqa: E402
from infer.runtime.kernels import decode_plan  # noqa: E402
from infer.runtime.kernels import counters  # noqa: E402


class _NoLaunch:
    """Stands in for the reduce kernel where the test expects it not to be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the reduce kernel was launched")


def _decode(batch, scale, num_splits, fused, combine, monkeypatch):
    """One launch with the combine forced on or off; returns (out, cache)."""
    monkeypatch.setattr(decode_kernels, "combine_in_partial", lambda *a: combine and a[2] > 1)
    if combine:
        monkeypatch.setattr(decode_kernels, "_decode_reduce_kernel", _NoLaunch())
    cache = batch.cache.clone()
    md = batch.md
    if fused:
        out = kernels.decode_attention_with_kv_write(batch.q, batch.k, batch.v, cache, md.slot_mapping, md.seq_lens,
                                                     md.block_tables, scale, config=CONFIG, num_splits=num_splits)
    else:
        kernels.write_kv_cache(batch.k, batch.v, cache, md.slot_mapping)
        out = kernels.decode_attention(batch.q, cache, md.seq_lens, md.block_tables, scale, config=CONFIG,
                                       num_splits=num_splits)
    monkeypatch.undo()
    return out, cache


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_splits", [2, 3, None])
@pytest.mark.parametrize("name", ["split_and_page_ends", "mid_page", "wide_table", "with_padding"])
def test_combine_in_partial_matches_the_reduce_kernel(name, num_splits, fused, monkeypatch):
    """The last split to arrive combines exactly as the reduce kernel does (bit-identical under the
    interpreter), padding sequences (length 0) still get zeros, and the counters are left at zero."""
    lengths, width = LENGTHS.get(name, ([20, 0, 33, 0], None))
    batch = make_batch([1] * len(lengths), [max(n, 1) for n in lengths], 4, 2, 64, 16, device=DEVICE, width=width,
                       seed=7)
    batch.md.seq_lens[:] = torch.tensor(lengths, dtype=batch.md.seq_lens.dtype)
    out, cache = _decode(batch, 0.125, num_splits, fused, True, monkeypatch)
    two, two_cache = _decode(batch, 0.125, num_splits, fused, False, monkeypatch)
    torch.testing.assert_close(cache, two_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(out, two, **SAME)
    ref = attend_reference(batch.q, cache, 0.125, batch.md)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        assert out[empty].abs().max() == 0
    assert all(int(b.abs().sum()) == 0 for b in counters.all_buffers())


def test_combine_in_partial_only_for_few_sequences(monkeypatch):
    """Batch 1-16 at 8 kv heads on 132 SMs combine in the partial kernel; batch 17 and up, one split,
    or INFER_DECODE_COMBINE=0 keep the reduce kernel."""
    monkeypatch.setattr(decode_plan, "sm_count", lambda device: H100_SMS)
    cpu = torch.device("cpu")
    assert decode_plan.combine_in_partial(1, 8, 9, cpu)
    assert decode_plan.combine_in_partial(16, 8, 2, cpu)
    assert not decode_plan.combine_in_partial(17, 8, 2, cpu)
    assert not decode_plan.combine_in_partial(1, 8, 1, cpu)
    with use_kernel_config(KernelConfig(decode_combine=False)):
        assert not decode_plan.combine_in_partial(1, 8, 9, cpu)


def test_latency_bound_launches_take_two_stages_and_few_programs_the_table():
    """Two pipeline stages for every latency-bound launch (fewer (sequence, kv head) pairs than
    SMs: batch 1-16 at 8 kv heads); of those, the register-held block table only below 3 split
    programs per SM (batch 1-4 at context 512); a set ``num_stages`` wins."""
    config = decode_plan.DecodeConfig(num_stages=None)

    def plan(batch, context=512):
        splits, _ = decode_plan.plan_splits(batch, 8, context, H100_SMS, config)
        return (decode_plan.plan_stages(config, batch, 8, H100_SMS),
                decode_plan.plan_table(batch, 8, splits, H100_SMS, 16, config.block_n) > 0)

    assert [plan(b) for b in (1, 2, 4, 8, 16, 17, 32, 64, 256)] == [
        (2, True), (2, True), (2, True), (2, False), (2, False), (3, False), (3, False), (3, False), (3, False)]
    assert plan(8, context=2048) == (2, False)  # nine splits of four tiles: still 576 programs
    assert plan(1, context=64) == (2, True)  # one tile: one split
    forced = decode_plan.DecodeConfig(num_stages=4)
    assert decode_plan.plan_stages(forced, 8, 8, H100_SMS) == 4
    assert decode_plan.plan_stages(forced, 64, 8, H100_SMS) == 4


def test_forced_stages_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFER_DECODE_STAGES", "2")
    assert KernelConfig.from_env().decode_stages == 2
    with use_kernel_config(KernelConfig.from_env()):
        assert decode_plan.plan_stages(decode_plan.DecodeConfig(), 64, 8, H100_SMS) == 2
    monkeypatch.setenv("INFER_DECODE_STAGES", "0")
    assert KernelConfig.from_env().decode_stages is None
    monkeypatch.setenv("INFER_DECODE_STAGES", "two")
    with pytest.raises(ValueError, match="INFER_DECODE_STAGES='two'"):
        KernelConfig.from_env()


@pytest.mark.parametrize("table_pages", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_block_table_chunks_match_per_tile_loads(table_pages, num_splits, monkeypatch):
    """Page ids held in registers a chunk at a time (chunks of 1-4 pages: several per sequence,
    ending mid-split and mid-sequence) give the output of per-tile table loads, bit for bit on
    the interpreter (``make_batch`` scatters the pages, so a wrong page id shows)."""
    from infer.runtime.kernels import decode_attention_triton as dat
    # the chunk as a latency-bound launch of few programs would plan it
    monkeypatch.setattr(dat, "plan_table", lambda *args: decode_plan.table_pages(*args[-2:]))
    batch = make_batch([1] * 4, [70, 33, 16, 100], 4, 2, 64, 16, device=DEVICE, width=8)
    with use_kernel_config(KernelConfig(decode_table_pages=0)):
        assert decode_plan.table_pages(16, 16) == 0
        per_tile, per_tile_cache, _, _ = run_both(batch, 0.125, num_splits)
    with use_kernel_config(KernelConfig(decode_table_pages=table_pages)):
        assert decode_plan.table_pages(16, 16) == table_pages
        fused, fused_cache, two, _ = run_both(batch, 0.125, num_splits)
    torch.testing.assert_close(fused_cache, per_tile_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(fused, per_tile, **SAME)
    torch.testing.assert_close(two, per_tile, **SAME)
    ref, _ = reference(batch, 0.125)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_table_chunk_needs_whole_pages_and_tiles(monkeypatch):
    """The register-held table only where planned, with whole pages per tile and whole tiles per
    chunk."""
    assert KernelConfig().decode_table_pages == 64
    assert decode_plan.table_pages(16, 64) == 64  # 16-token pages, 64-token tiles
    assert decode_plan.table_pages(64, 64) == 64
    assert decode_plan.table_pages(128, 64) == 0  # a page larger than a tile: per-tile loads
    assert decode_plan.plan_table(1, 8, 8, H100_SMS, 16, 64) == 64  # 64 programs, latency-bound
    assert decode_plan.plan_table(8, 8, 8, H100_SMS, 16, 64) == 0  # 512 short-split programs
    assert decode_plan.plan_table(64, 8, 1, H100_SMS, 16, 64) == 0  # not latency-bound
    with use_kernel_config(KernelConfig(decode_table_pages=0)):
        assert decode_plan.plan_table(1, 8, 8, H100_SMS, 16, 64) == 0  # switched off


def test_table_pages_from_the_environment(monkeypatch):
    monkeypatch.delenv("INFER_DECODE_TABLE_PAGES", raising=False)
    assert KernelConfig.from_env().decode_table_pages == 64
    monkeypatch.setenv("INFER_DECODE_TABLE_PAGES", "0")
    assert KernelConfig.from_env().decode_table_pages == 0
    monkeypatch.setenv("INFER_DECODE_TABLE_PAGES", "48")
    with pytest.raises(ValueError, match="INFER_DECODE_TABLE_PAGES='48': expected 0 .* or a power of two"):
        KernelConfig.from_env()
    monkeypatch.setenv("INFER_DECODE_TABLE_PAGES", "lots")
    with pytest.raises(ValueError, match="INFER_DECODE_TABLE_PAGES='lots'"):
        KernelConfig.from_env()
    with pytest.raises(ValueError, match="decode_table_pages must be 0 or a power of two, got 48"):
        KernelConfig(decode_table_pages=48)
