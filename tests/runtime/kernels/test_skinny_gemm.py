"""The Triton skinny GEMM for decode batches of 3-64 rows: against F.linear (under the interpreter on
CPU, natively on CUDA), its tile choice, what it accepts, and where ``infer::linear`` uses it."""
import pytest
import torch
import torch.nn.functional as F

from infer.runtime.kernels.tuning import KernelConfig, use_kernel_config
from infer.runtime.kernels import counters
from infer.runtime.kernels import skinny_gemm_triton as sk
from infer.runtime.kernels.skinny_gemm_triton import MAX_ROWS, SkinnyConfig, choose_config, skinny_gemm
from infer.runtime.ops import linear as L

QWEN_06B = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
OTHER = [(16, 64), (48, 192), (1152, 128), (2048, 2048)]


def reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("rows, n, k, bias", [(3, 32, 256, False), (17, 48, 256, True), (64, 16, 512, False)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_f_linear_and_leaves_counters_at_zero(dtype, rows, n, k, bias, split, tma):
    g = torch.Generator().manual_seed(rows * 7 + split)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = skinny_gemm(x, w, b, config=SkinnyConfig(block_n=16, block_k=64, split_k=split, tma=tma))
    assert y.shape == (rows, n) and y.dtype == dtype
    # one rounding of an fp32 sum (the interpreter's bf16 cast truncates: up to one ulp)
    torch.testing.assert_close(y.float(), reference(x, w, b), atol=2e-2, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert all(int(c.abs().sum()) == 0 for c in counters.all_buffers())


def test_split_partials_sum_in_split_order():
    """Whichever split arrives last, the sum runs over splits 0, 1, 2, 3: repeated launches agree bit for bit."""
    x = torch.randn(5, 512).to(torch.bfloat16)
    w = torch.randn(32, 512).to(torch.bfloat16)
    cfg = SkinnyConfig(block_n=16, block_k=64, split_k=4)
    first = skinny_gemm(x, w, config=cfg)
    assert torch.equal(first, skinny_gemm(x, w, config=cfg))


@pytest.mark.parametrize("rows", [3, 16, 17, 32, 40, 64])
@pytest.mark.parametrize("n, k", QWEN_06B + SMOLLM2 + OTHER, ids=str)
def test_chosen_tiles_fit_the_weight(n, k, rows):
    key = (max(16, 1 << (rows - 1).bit_length()), n, k)
    tuned = key in sk.TUNED
    cfg = choose_config(rows, n, k)
    assert (sk.tuned_config(rows, n, k) is not None) == (tuned and sk.TUNED[key] is not None)
    assert n % cfg.block_n == 0 and k % (cfg.split_k * cfg.block_k) == 0
    assert cfg.block_n * cfg.block_k <= 16384
    if not tuned:
        programs = (n // cfg.block_n) * cfg.split_k
        most = max((n // bn) * s for bn in (16, 32, 64) for s in (1, 2, 4, 8)
                   if n % bn == 0 and any(k % (s * bk) == 0 for bk in (64, 128, 256, 512)))
        assert programs >= min(sk.MIN_PROGRAMS, most)


def test_tuned_tiles_are_the_measured_projections():
    assert {(n, k) for _, n, k in sk.TUNED} == set(QWEN_06B + SMOLLM2)
    assert {rows for rows, _, _ in sk.TUNED} == {16, 32, 64}
    assert [key for key, cfg in sk.TUNED.items() if cfg is None] == [(r, 3072, 576) for r in (16, 32, 64)]


def test_supports_only_measured_shapes_it_tiles():
    meta = dict(device="meta", dtype=torch.bfloat16)
    fake_cuda = lambda t: type("T", (), {"is_cuda": True, "dim": t.dim, "shape": t.shape, "dtype": t.dtype,  # noqa: E731
                                          "stride": t.stride, "element_size": t.element_size,
                                          "data_ptr": lambda self=None: 0})()
    w = torch.empty(1024, 2048, **meta)  # Qwen3-0.6B's o projection
    ok = fake_cuda(torch.empty(8, 2048, **meta))
    assert sk.supports(ok, w)
    assert not sk.supports(torch.empty(8, 2048, dtype=torch.bfloat16), w)  # not CUDA
    assert not sk.supports(fake_cuda(torch.empty(MAX_ROWS + 1, 2048, **meta)), w)
    assert not sk.supports(fake_cuda(torch.empty(8, 2048, device="meta")), w.float())  # fp32
    assert not sk.supports(ok, w, torch.empty(1024, dtype=torch.float16, device="meta"))  # a bias of another dtype
    odd = fake_cuda(torch.empty(8, 2052, **meta)[:, :2048])  # row stride of 4104 bytes: not TMA aligned
    assert not sk.supports(odd, w)
    gate_up = torch.empty(3072, 576, **meta)  # SmolLM2's gate_up: cuBLAS measured faster
    assert not sk.supports(fake_cuda(torch.empty(8, 576, **meta)), gate_up)
    assert sk.supports(fake_cuda(torch.empty(8, 576, **meta)), torch.empty(960, 576, **meta))
    for n, k in [(2048, 1024), (4096, 4096), (1000, 2048)]:  # a TP shard of 0.6B's qkv, 8B's o, N % 16
        assert not sk.supports(fake_cuda(torch.empty(8, k, **meta)), torch.empty(n, k, **meta))
    assert L.SKINNY_MAX_ROWS == MAX_ROWS


def test_too_many_rows_and_untileable_config_are_errors():
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_gemm(torch.randn(MAX_ROWS + 1, 64), torch.randn(16, 64))
    with pytest.raises(ValueError, match="does not tile"):
        skinny_gemm(torch.randn(4, 64), torch.randn(16, 64), config=SkinnyConfig(16, 64, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [3, 8, 16, 33, 64])
@pytest.mark.parametrize("n, k", QWEN_06B + SMOLLM2 + OTHER, ids=str)
def test_linear_op_takes_the_skinny_gemm_on_cuda(n, k, rows, monkeypatch):
    """``infer::linear`` runs the kernel for 3-64 rows of the measured shapes (not SmolLM2's gate_up,
    where cuBLAS measured faster, nor unmeasured ones) and matches cuBLAS; with INFER_SKINNY_GEMM=0
    it is cuBLAS itself."""
    calls = []
    monkeypatch.setattr(L, "_skinny", lambda *a, **kw: calls.append(a[0].shape[0]) or skinny_gemm(*a, **kw))
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    y = torch.ops.infer.linear(x, w, None)
    expected_calls = [rows] if sk.tuned_config(rows, n, k) is not None else []  # else cuBLAS
    assert expected_calls == [rows] or (n, k) not in QWEN_06B
    assert calls == expected_calls
    torch.testing.assert_close(y.float(), reference(x, w, None), atol=2e-2, rtol=1e-2)
    with use_kernel_config(KernelConfig(skinny_gemm=False)):  # what INFER_SKINNY_GEMM=0 sets
        assert torch.equal(torch.ops.infer.linear(x, w, None), F.linear(x, w)) and calls == expected_calls


@pytest.mark.gpu
def test_split_k_replays_in_a_cuda_graph():
    x = torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16) * 0.05
    assert choose_config(64, 1024, 3072).split_k > 1
    skinny_gemm(x, w)  # counters allocated outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_gemm(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y.float(), reference(x, w, None), atol=5e-2, rtol=1e-2)
    assert all(int(c.abs().sum()) == 0 for c in counters.all_buffers())
