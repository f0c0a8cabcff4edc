"""Prologue-fused linears: the Triton GEMV (under the interpreter on CPU) and the ops against the
plain-torch chains they stand for."""
import pytest
import torch

from conftest import DEVICES
from infer.runtime.kernels.gemv_triton import MAX_ROWS, GemvConfig, gemv
from infer.runtime.ops import linear as L

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
EPS = 1e-6
KERNEL_DEVICE = DEVICES[-1]  # the Triton kernel runs natively on CUDA, under the interpreter on CPU


def inputs(prologue, m, k, n, dtype, bias, norm_weight=True, seed=0):
    """(gemv kwargs, op name, op args) for one case; gate/up are column halves of one buffer."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(KERNEL_DEVICE, dtype)  # noqa: E731
    x, r, w = rand(m, k), rand(m, k), rand(n, k) * 0.1
    b = rand(n) if bias else None
    nw = rand(k) if norm_weight else None
    if prologue == "none":
        return dict(x=x, weight=w, bias=b), "linear", (x, w, b)
    if prologue == "rms":
        return (dict(x=x, weight=w, bias=b, prologue="rms", norm_weight=nw, eps=EPS, cast_before_weight=True),
                "rms_norm_linear", (x, nw, EPS, True, dtype, w, b))
    if prologue == "add_rms":
        return (dict(x=x, weight=w, bias=b, prologue="add_rms", residual=r, norm_weight=nw, eps=EPS),
                "add_rms_norm_linear", (x, r, nw, EPS, False, dtype, w, b))
    packed = rand(m, 2 * k)
    gate, up = packed[:, :k], packed[:, k:]
    return dict(x=gate, weight=w, bias=b, prologue="silu_mul", x2=up), "silu_mul_linear", (gate, up, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 96, 40), (2, 64, 9), (3, 200, 17)], ids=str)
@pytest.mark.parametrize("prologue", ["none", "rms", "add_rms", "silu_mul"])
def test_gemv_matches_unfused_chain(prologue, shape, dtype):
    m, k, n = shape
    kwargs, name, args = inputs(prologue, m, k, n, dtype, bias=(m == 2))
    x, w, b = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias")
    y, s = gemv(x, w, b, config=GemvConfig(block_n=4, block_k=64, num_warps=1), **kwargs)
    expected = L.reference(name, *args)
    if prologue == "add_rms":
        expected, expected_s = expected
        torch.testing.assert_close(s, expected_s, **TOL[dtype])  # interpreter bf16 casts truncate
    else:
        assert s is None
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])


def test_gemv_without_norm_weight_and_too_many_rows():
    kwargs, name, args = inputs("rms", 2, 32, 8, torch.float32, bias=False, norm_weight=False)
    x, w = kwargs.pop("x"), kwargs.pop("weight")
    kwargs.pop("bias")
    torch.testing.assert_close(gemv(x, w, **kwargs)[0], L.reference(name, *args), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        gemv(torch.randn(MAX_ROWS + 1, 32, device=KERNEL_DEVICE), w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("prologue", ["none", "rms", "add_rms", "silu_mul"])
def test_ops_equal_their_chains(prologue, rows, device):
    """On CPU the op is the chain itself (bit-exact); on CUDA it may take the GEMV for few rows."""
    _, name, args = inputs(prologue, rows, 128, 48, torch.bfloat16, bias=True)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    got = getattr(torch.ops.infer, name)(*args)
    expected = L.reference(name, *args)
    exact = dict(atol=0, rtol=0) if device == "cpu" else TOL[torch.bfloat16]
    torch.testing.assert_close(got, expected, **exact)


def test_ops_reject_bad_input():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"weight \[N, K=16\]"):
        torch.ops.infer.linear(x, torch.randn(8, 15), None)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.infer.linear(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="2-d input"):
        torch.ops.infer.linear(x[None], w, None)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.infer.linear(x.double(), w, None)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.infer.add_rms_norm_linear(x, torch.randn(3, 16), None, EPS, False, torch.float32, w, None)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.infer.silu_mul_linear(x, torch.randn(2, 8), w, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("prologue", ["none", "add_rms", "silu_mul"])
def test_large_weight_configs_match_the_chain(prologue, rows):
    """An 8B-sized projection (4096 x 4096) through the configs ``choose_config`` picks for large
    weights (evict-first weight loads; 2 x 4096 tiles on 8 warps for one row), and the same tile
    without the cache hint: the hint changes nothing, bit for bit."""
    from infer.runtime.kernels.gemv_triton import LARGE_WEIGHT, choose_config

    m, k, n = rows, 4096, 4096
    assert n * k >= LARGE_WEIGHT
    kwargs, name, args = inputs(prologue, m, k, n, torch.bfloat16, bias=False)
    x, w, _ = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias")
    config = choose_config(m, n, k, x.device, prologue)
    assert config.w_evict == "evict_first"
    y, _ = gemv(x, w, config=config, **kwargs)
    expected = L.reference(name, *args)
    expected = expected[0] if prologue == "add_rms" else expected
    torch.testing.assert_close(y, expected, **TOL[torch.bfloat16])
    unhinted = GemvConfig(config.block_n, config.block_k, config.num_warps)
    assert torch.equal(gemv(x, w, config=unhinted, **kwargs)[0], y)
