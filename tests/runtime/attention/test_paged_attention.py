"""Paged attention: reference vs naive dense attention, Triton kernels vs reference, compile, errors."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from infer.runtime.attention import Attention, AttentionMetadata, forward_context, select_backend  # noqa: E402
from infer.runtime.attention.reference import attend_reference  # noqa: E402

CUDA = torch.cuda.is_available()
# The Triton kernel tests run on CPU tensors under the interpreter, else on the GPU.
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new tokens (zeros for padding)
    v: torch.Tensor
    cache: torch.Tensor  # [2, num_blocks, bs, Hkv, D], prefixes written, NaN elsewhere
    md: AttentionMetadata
    keys: list  # per sequence [seq_len, Hkv, D], contiguous ground truth
    values: list


def make_batch(query_lens, seq_lens, hq, hkv, d, bs, dtype=torch.float32, device="cpu", pad=0, width=None, seed=0,
               num_blocks=None):
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-s // bs) for s in seq_lens]
    num_blocks = num_blocks or sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous pages
    tables = [perm[sum(per_seq[:b]):sum(per_seq[:b + 1])] for b in range(len(seq_lens))]
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"))
    keys = [torch.randn(s, hkv, d, generator=gen).to(dtype).float() for s in seq_lens]
    values = [torch.randn(s, hkv, d, generator=gen).to(dtype).float() for s in seq_lens]
    flat = cache.view(2, -1, hkv, d)
    for b, (q_len, s) in enumerate(zip(query_lens, seq_lens)):  # write the cached prefix
        pos = torch.arange(s - q_len)
        slots = torch.tensor(tables[b], dtype=torch.long)[pos // bs] * bs + pos % bs
        flat[0, slots], flat[1, slots] = keys[b][:s - q_len], values[b][:s - q_len]
    new_k = [keys[b][s - ql:] for b, (ql, s) in enumerate(zip(query_lens, seq_lens))] + [torch.zeros(pad, hkv, d)]
    new_v = [values[b][s - ql:] for b, (ql, s) in enumerate(zip(query_lens, seq_lens))] + [torch.zeros(pad, hkv, d)]
    q = torch.randn(sum(query_lens) + pad, hq, d, generator=gen)
    md = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device,
                                 pad_tokens_to=sum(query_lens) + pad, max_blocks_per_seq=width)
    to = dict(device=device, dtype=dtype)
    return Batch(q.to(**to), torch.cat(new_k).to(**to), torch.cat(new_v).to(**to), cache.to(**to), md, keys, values)


def naive_attention(batch: Batch, scale: float) -> torch.Tensor:
    """Dense causal softmax from contiguous K/V, independent of the cache."""
    q = batch.q.float().cpu()
    out = torch.zeros_like(q)
    group = q.shape[1] // batch.keys[0].shape[1] if batch.keys else 1
    start = 0
    for keys, values, s, ql in zip(batch.keys, batch.values, batch.md.seq_lens.tolist(),
                                   torch.diff(batch.md.query_start_loc).tolist()):
        k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [L, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q[start:start + ql], k) * scale
        keep = torch.ones(ql, s, dtype=torch.bool).tril(diagonal=s - ql)
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        out[start:start + ql] = torch.einsum("hqk,khd->qhd", probs, v)
        start += ql
    return out


def check_cache(batch: Batch) -> None:
    hkv, d = batch.cache.shape[3:]
    n = int(batch.md.query_start_loc[-1])
    slots = batch.md.slot_mapping[:n]
    flat = batch.cache.view(2, -1, hkv, d)
    torch.testing.assert_close(flat[0, slots], batch.k[:n], rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots], batch.v[:n], rtol=0, atol=0)


# (query_lens, seq_lens, Hq, Hkv, D, block_size)
CASES = {
    "prefill": ([5, 17, 33], [5, 17, 33], 4, 4, 64, 16),
    "prefill_prefix": ([3, 16, 20], [20, 40, 20], 4, 2, 64, 16),
    "decode": ([1, 1, 1, 1], [1, 16, 17, 50], 8, 2, 64, 16),
    "mixed": ([1, 7, 1, 20], [33, 7, 16, 52], 8, 4, 128, 32),
    "gqa4_bs32": ([9, 1, 31], [40, 64, 65], 8, 2, 128, 32),
    "mqa": ([4, 1], [35, 17], 8, 1, 64, 16),
    "head_dim_256": ([2, 1], [18, 33], 4, 2, 256, 16),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_and_reference_ops_match_naive(name, layout, backend, monkeypatch):
    """The CPU backend (batched, the default on CPU) and the reference, through the op; the cache's
    unwritten slots hold NaN, which must not reach any output."""
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", backend)
    query_lens, seq_lens, hq, hkv, d, bs = CASES[name]
    batch = make_batch(query_lens, seq_lens, hq, hkv, d, bs, pad=2)
    q, k, v = (x.flatten(1) if layout == "2d" else x for x in (batch.q, batch.k, batch.v))
    with forward_context(batch.md):
        out = torch.ops.infer.paged_attention(q, k, v, batch.cache, d**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.view(batch.q.shape), naive_attention(batch, d**-0.5), rtol=1e-4, atol=1e-4)
    check_cache(batch)
    assert torch.isnan(batch.cache).any()  # untouched slots were not written (padding skipped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_with_padding_rows_and_empty_sequences(dtype, monkeypatch):
    """A decode batch as the engine pads it: dummy sequences of length 0 (all-padding rows) get zeros."""
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "cpu")
    batch = make_batch([1, 1, 1], [9, 1, 30], 6, 2, 64, 16, dtype=dtype, pad=3, seed=4)
    md = dataclasses.replace(  # a fourth, empty sequence in the padding (as DecodeBuffers.clear leaves it)
        batch.md, query_start_loc=torch.arange(5, dtype=torch.int32), num_seqs=4, num_tokens=4,
        seq_lens=torch.tensor([9, 1, 30, 0], dtype=torch.int32),
        block_tables=torch.cat([batch.md.block_tables, torch.zeros(1, 2, dtype=torch.int32)]))
    with forward_context(md):
        out = torch.ops.infer.paged_attention(batch.q, batch.k, batch.v, batch.cache, 0.125)
    with forward_context(batch.md):
        expected = attend_reference(batch.q, batch.cache, 0.125, batch.md)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:3], expected[:3], rtol=tol, atol=tol)
    assert out[3:].abs().max() == 0


def _triton():
    pytest.importorskip("triton")
    from infer.runtime.kernels import attention_triton
    return attention_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_write_kv_cache(dtype):
    kernels = _triton()
    batch = make_batch([3, 1], [20, 17], 4, 2, 64, 16, dtype=dtype, pad=2, device=KERNEL_DEVICE)
    kernels.write_kv_cache(batch.k, batch.v, batch.cache, batch.md.slot_mapping)
    check_cache(batch)
    assert int(torch.isnan(batch.cache).sum()) > 0


@pytest.mark.parametrize("splits", [1, 3, None])
def test_triton_decode_kernel(splits):
    kernels = _triton()
    batch = make_batch([1, 1, 1], [40, 17, 1], 4, 2, 64, 16, pad=1, device=KERNEL_DEVICE)
    batch.md.seq_lens[2] = 0  # CUDA-graph padding sequence: zero output
    kernels.write_kv_cache(batch.k, batch.v, batch.cache, batch.md.slot_mapping)
    config = kernels.DecodeConfig(block_n=16)
    out = kernels.decode_attention(batch.q, batch.cache, batch.md.seq_lens, batch.md.block_tables, 0.125,
                                   config=config, num_splits=splits)
    ref = attend_reference(batch.q, batch.cache, 0.125, batch.md)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out[2:].abs().max() == 0


@pytest.mark.parametrize("block_m", [16, 64])
def test_triton_prefill_kernel(block_m):
    """Prefixes of 29 and 32 tokens and a 23-token prompt: with 16-token key tiles, every sequence has
    tiles left of its diagonal (the kernel's unmasked loop) and tiles across it (the masked loop)."""
    kernels = _triton()
    batch = make_batch([1, 23, 5], [30, 23, 37], 4, 2, 64, 16, dtype=torch.float16, pad=2, device=KERNEL_DEVICE)
    kernels.write_kv_cache(batch.k, batch.v, batch.cache, batch.md.slot_mapping)
    config = kernels.PrefillConfig(block_m=block_m, block_n=16)
    md = batch.md
    out = kernels.prefill_attention(batch.q, batch.cache, md.query_start_loc, md.seq_lens, md.block_tables,
                                    md.max_query_len, 0.125, config=config)
    ref = attend_reference(batch.q, batch.cache, 0.125, md)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert out[-2:].abs().max() == 0


class _Launches:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call, runs nothing."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))

    def scalars(self) -> list:
        """Every non-tensor argument of every call (what Triton specializes or types by value)."""
        return [([a for a in args if not isinstance(a, torch.Tensor)], kwargs) for args, kwargs in self.calls]


def test_kernel_arguments_do_not_depend_on_the_cache_block_count(monkeypatch):
    """The startup profile run names the write/prefill kernel variants on a small temporary cache;
    the real cache may be 1000x larger. No launch argument may follow the block count: an int past
    2**31 (the distance between the K and V halves of a 70 GB cache, in elements) is typed i64 by
    Triton, a kernel variant nobody compiled at startup."""
    kernels = _triton()
    from infer.runtime.kernels import decode_attention_triton, prefill_attention_triton
    recorded = {}
    for num_blocks in (8, 4096):
        launches = {name: _Launches() for name in ("write", "decode", "prefill")}
        monkeypatch.setattr(kernels, "_write_kv_kernel", launches["write"])
        monkeypatch.setattr(decode_attention_triton, "_decode_partial_kernel", launches["decode"])
        monkeypatch.setattr(prefill_attention_triton, "_prefill_kernel", launches["prefill"])
        batch = make_batch([1, 1], [20, 17], 4, 2, 64, 16, num_blocks=num_blocks, width=8)
        kernels.write_kv_cache(batch.k, batch.v, batch.cache, batch.md.slot_mapping)
        md = batch.md
        kernels.decode_attention(batch.q, batch.cache, md.seq_lens, md.block_tables, 0.125, num_splits=1)
        kernels.decode_attention_with_kv_write(batch.q, batch.k.view(2, 2, 64), batch.v.view(2, 2, 64), batch.cache,
                                               md.slot_mapping, md.seq_lens, md.block_tables, 0.125, num_splits=1)
        kernels.prefill_attention(batch.q, batch.cache, md.query_start_loc, md.seq_lens, md.block_tables,
                                  md.max_query_len, 0.125)
        recorded[num_blocks] = {name: launch.scalars() for name, launch in launches.items()}
        assert [len(recorded[num_blocks][n]) for n in ("write", "decode", "prefill")] == [1, 2, 1]
    assert recorded[8] == recorded[4096]


def test_triton_prefill_kernel_zeroes_every_padding_row():
    """Padding rows are zeroed by the kernel, not by a fill of the whole output: with ``out`` full of
    NaN and more padding rows (40) than one pass of the padding programs covers (2 x 16), every real
    row holds attention and every padding row is 0."""
    kernels = _triton()
    batch = make_batch([1, 23, 5], [30, 23, 37], 4, 2, 64, 16, dtype=torch.float16, pad=40, device=KERNEL_DEVICE)
    kernels.write_kv_cache(batch.k, batch.v, batch.cache, batch.md.slot_mapping)
    md = batch.md
    out = torch.full_like(batch.q, float("nan"))
    got = kernels.prefill_attention(batch.q, batch.cache, md.query_start_loc, md.seq_lens, md.block_tables,
                                    md.max_query_len, 0.125, out=out, config=kernels.PrefillConfig(16, 16))
    assert got is out
    torch.testing.assert_close(out, attend_reference(batch.q, batch.cache, 0.125, md), rtol=2e-3, atol=2e-3)
    assert out[-40:].abs().max() == 0

@pytest.mark.parametrize("name", ["decode", "prefill_prefix"])
def test_triton_backend_through_op(name, monkeypatch):
    _triton()
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton imported before TRITON_INTERPRET was set")
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "triton")
    query_lens, seq_lens, hq, hkv, d, bs = CASES[name]
    batch = make_batch(query_lens, seq_lens, hq, hkv, d, bs, device="cuda" if CUDA else "cpu")
    with forward_context(batch.md):
        out = torch.ops.infer.paged_attention(batch.q, batch.k, batch.v, batch.cache, d**-0.5)
    torch.testing.assert_close(out.cpu(), naive_attention(batch, d**-0.5), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_layer_matches_eager_and_mutates_cache(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    prefill = make_batch([5, 12], [5, 20], 4, 2, 64, 16, seed=1, num_blocks=40)
    decode = make_batch([1] * 17, [1 + 2 * i for i in range(17)], 4, 2, 64, 16, seed=2, num_blocks=40)
    counter = CompileCounterWithBackend(backend)
    eager_layer, compiled_layer = Attention(4, 2, 64), Attention(4, 2, 64)
    fn = torch.compile(compiled_layer, backend=counter, fullgraph=True)
    for batch in (prefill, decode):  # same T = 17, different metadata
        eager_layer.bind_kv_cache(batch.cache.clone())
        compiled_layer.bind_kv_cache(batch.cache)
        q, k, v = batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1)
        with forward_context(batch.md):
            expected = eager_layer(q, k, v)
            out = fn(q, k, v)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(out.view(batch.q.shape), naive_attention(batch, 0.125), rtol=1e-4, atol=1e-4)
        check_cache(batch)  # the compiled call wrote into the bound cache
    assert counter.frame_count == 1  # metadata is not a graph input: one graph serves both steps


def test_opcheck_schema_fake_and_functionalization():
    batch = make_batch([3, 1], [20, 17], 4, 2, 64, 16, pad=1)
    cache = batch.cache.nan_to_num(0.0)  # opcheck compares caches across runs
    with forward_context(batch.md):
        torch.library.opcheck(torch.ops.infer.paged_attention.default,
                              (batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1), cache, 0.125))


def test_errors_are_clear(monkeypatch):
    layer = Attention(4, 2, 64)
    q, kv = torch.zeros(3, 256), torch.zeros(3, 128)
    with pytest.raises(RuntimeError, match=r"outside infer\.runtime\.attention\.forward_context"):
        layer(q, kv, kv)
    with pytest.raises(ValueError, match=r"\[2, num_blocks, block_size, 2, 64\]"):
        layer.bind_kv_cache(torch.zeros(2, 4, 16, 4, 64))
    with pytest.raises(ValueError, match="not a multiple"):
        Attention(6, 4, 64)
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="INFER_ATTENTION_BACKEND='cudnn'"):
        select_backend("cpu")
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "flash_attn")
    with pytest.raises(RuntimeError, match="flash_attn"):
        select_backend("cpu")
    monkeypatch.delenv("INFER_ATTENTION_BACKEND")
    assert select_backend("cpu") == "cpu"
    with pytest.raises(ValueError, match="needs 2 blocks"):
        AttentionMetadata.build([1], [17], [[0]], 16)
    with pytest.raises(ValueError, match="query_len=5 seq_len=3"):
        AttentionMetadata.build([5], [3], [[0]], 16)


def test_flash_attn_runs_only_when_asked_for(monkeypatch):
    """The flash-attn adapter is opt-in: with the package present, CUDA still picks Triton."""
    from infer.runtime.attention import op
    monkeypatch.setattr(op, "flash_attn_available", lambda: True)
    monkeypatch.setattr(op, "_triton_available", lambda: True)
    monkeypatch.delenv("INFER_ATTENTION_BACKEND", raising=False)
    assert select_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "flash_attn")
    assert select_backend(torch.device("cuda")) == "flash_attn"


def test_forward_context_nests_and_restores():
    from infer.runtime.attention import get_forward_context

    outer = AttentionMetadata.build([1], [1], [[0]], 16)
    inner = AttentionMetadata.build([2], [2], [[1]], 16)
    assert outer.is_uniform_decode and not inner.is_uniform_decode
    with forward_context(outer):
        with pytest.raises(KeyError):
            with forward_context(inner):
                assert get_forward_context() is inner
                raise KeyError("boom")
        assert get_forward_context() is outer
    with pytest.raises(RuntimeError):
        get_forward_context()


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
GPU_CASES = {
    "boundaries_prefill": ([15, 16, 17, 31, 33], [15, 16, 17, 31, 33]),
    "prefix": ([1, 17, 300, 64], [1000, 33, 2048, 4096]),
    "decode": ([1] * 8, [1, 15, 16, 17, 255, 1000, 4097, 8192]),
    "mixed": ([1, 1, 129, 1, 16], [8192, 17, 300, 64, 16]),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_triton_matches_reference(name, d, heads, monkeypatch):
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "triton")
    query_lens, seq_lens = GPU_CASES[name]
    batch = make_batch(query_lens, seq_lens, *heads, d, 16, dtype=torch.bfloat16, device="cuda", pad=3)
    ref_cache = batch.cache.clone()
    with forward_context(batch.md):
        out = torch.ops.infer.paged_attention(batch.q, batch.k, batch.v, batch.cache, d**-0.5)
    from infer.runtime.attention.reference import paged_attention_reference

    ref = paged_attention_reference(batch.q, batch.k, batch.v, ref_cache, d**-0.5, batch.md)
    torch.testing.assert_close(batch.cache, ref_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_decode_cuda_graph_replay(block_size):
    kernels = _triton()
    width, hq, hkv, d = 8192 // block_size, 16, 8, 128
    first = make_batch([1] * 4, [5, 100, 1000, 17], hq, hkv, d, block_size, torch.bfloat16, "cuda", width=width)
    second = make_batch([1] * 4, [3000, 1, 64, 8192], hq, hkv, d, block_size, torch.bfloat16, "cuda", width=width,
                        seed=7)
    cache = torch.zeros(2, max(first.cache.shape[1], second.cache.shape[1]), block_size, hkv, d,
                        dtype=torch.bfloat16, device="cuda")
    md = first.md
    q = first.q.clone()
    cache[:, :first.cache.shape[1]] = first.cache.nan_to_num(0.0)
    kernels.write_kv_cache(first.k, first.v, cache, md.slot_mapping)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.decode_attention(q, cache, md.seq_lens, md.block_tables, d**-0.5)  # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_attention(q, cache, md.seq_lens, md.block_tables, d**-0.5)
    graph.replay()
    torch.testing.assert_close(out, attend_reference(q, cache, d**-0.5, md), rtol=2e-2, atol=2e-2)

    cache.zero_()[:, :second.cache.shape[1]] = second.cache.nan_to_num(0.0)  # same shapes, new contents
    kernels.write_kv_cache(second.k, second.v, cache, second.md.slot_mapping)
    md.seq_lens.copy_(second.md.seq_lens)
    md.block_tables.copy_(second.md.block_tables)
    q.copy_(second.q)
    graph.replay()
    torch.testing.assert_close(out, attend_reference(q, cache, d**-0.5, second.md), rtol=2e-2, atol=2e-2)
