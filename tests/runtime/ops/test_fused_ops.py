"""Fused ops ``infer::rms_norm``, ``infer::fused_add_rms_norm``, ``infer::silu_and_mul``.

Three layers are compared: the eager spelling the fusion passes replace (written out here),
the plain-torch reference behind ``torch.ops.infer.*`` on CPU (must match eager exactly),
and the Triton launchers (CPU tensors under ``TRITON_INTERPRET=1``, else CUDA).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import infer.runtime.ops  # noqa: E402,F401  (registers torch.ops.infer.*)

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [8, 33, 96, 128]
ROWS = [0, 1, 3, 5]
# (has_weight, cast_before_weight)
WEIGHT_MODES = [(False, False), (True, True), (True, False)]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
# The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even), so
# interpreted bf16 results may sit up to ~2 bf16 ulps away from the reference.
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2 if INTERPRET else 2e-2}


@pytest.fixture(scope="module")
def kern():
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from infer.runtime.kernels import activation_triton, norm_triton
    return norm_triton, activation_triton


def eager_rms_norm(x, w, eps, cast_before_weight, out_dtype):
    """The Hugging Face Llama spelling (cast_before_weight) and its fp32-weight variant."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if w is None:
        return h.to(out_dtype)
    if cast_before_weight:
        return (w * h.to(x.dtype)).to(out_dtype)
    return (h * w.float()).to(out_dtype)


def eager_silu_and_mul(gate, up):
    return F.silu(gate) * up


def close(actual, expected, dtype=None):
    tol = KERNEL_TOL[dtype or expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual, expected = actual.cpu(), expected.cpu()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    if expected.dtype == torch.float16 or (expected.dtype == torch.bfloat16 and not INTERPRET):
        # Rounding points must match eager: a missing or extra rounding step flips the last
        # bit of about a quarter of the elements, sum-order noise only a few.
        flipped = (actual != expected).sum().item()
        assert flipped <= max(1, expected.numel() // 20), f"{flipped}/{expected.numel()} differ"


def make_norm_inputs(rows, hidden, dtype, has_weight, cast_before_weight, device="cpu"):
    x = torch.randn(rows, hidden, dtype=dtype, device=device) * 2  # [T, H]
    w = torch.randn(hidden, dtype=dtype, device=device) if has_weight else None  # [H]
    out_dtype = torch.promote_types(dtype, w.dtype) if has_weight else dtype
    return x, w, out_dtype


# ---------------------------------------------------------------- rms_norm / fused_add
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("has_weight,cast_before_weight", WEIGHT_MODES)
def test_rms_norm(kern, dtype, hidden, rows, has_weight, cast_before_weight):
    x, w, out_dtype = make_norm_inputs(rows, hidden, dtype, has_weight, cast_before_weight)
    eager = eager_rms_norm(x, w, EPS, cast_before_weight, out_dtype)
    op = torch.ops.infer.rms_norm(x, w, EPS, cast_before_weight, out_dtype)
    torch.testing.assert_close(op, eager, rtol=0, atol=0)
    dev = KERNEL_DEVICE
    got = kern[0].rms_norm_triton(x.to(dev), None if w is None else w.to(dev), EPS,
                                  cast_before_weight, out_dtype)
    close(got, eager, dtype)
    chunked = kern[0].rms_norm_triton(x.to(dev), None if w is None else w.to(dev), EPS,
                                      cast_before_weight, out_dtype, max_block=16)
    close(chunked, eager, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("has_weight,cast_before_weight", WEIGHT_MODES)
def test_fused_add_rms_norm(kern, dtype, hidden, rows, has_weight, cast_before_weight):
    x, w, out_dtype = make_norm_inputs(rows, hidden, dtype, has_weight, cast_before_weight)
    res = torch.randn_like(x)
    s_eager = x + res
    eager = eager_rms_norm(s_eager, w, EPS, cast_before_weight, out_dtype)
    out, s = torch.ops.infer.fused_add_rms_norm(x, res, w, EPS, cast_before_weight, out_dtype)
    torch.testing.assert_close(s, s_eager, rtol=0, atol=0)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    dev = KERNEL_DEVICE
    wd = None if w is None else w.to(dev)
    for max_block in (kern[0].MAX_FUSED_BLOCK, 16):
        got, got_s = kern[0].fused_add_rms_norm_triton(x.to(dev), res.to(dev), wd, EPS,
                                                       cast_before_weight, out_dtype,
                                                       max_block=max_block)
        close(got_s, s_eager, dtype)
        close(got, eager, dtype)


def test_mixed_dtypes(kern):
    """bf16 activations with fp32 weight / fp32 residual: promotion as in eager."""
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.float32)
    res = torch.randn(3, 40, dtype=torch.float32)
    eager = eager_rms_norm(x, w, EPS, True, torch.float32)
    torch.testing.assert_close(torch.ops.infer.rms_norm(x, w, EPS, True, torch.float32), eager,
                               rtol=0, atol=0)
    close(kern[0].rms_norm_triton(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), EPS, True,
                                  torch.float32), eager, torch.bfloat16)
    out, s = torch.ops.infer.fused_add_rms_norm(x, res, w, EPS, False, torch.bfloat16)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, x + res, rtol=0, atol=0)
    torch.testing.assert_close(out, eager_rms_norm(x + res, w, EPS, False, torch.bfloat16),
                               rtol=0, atol=0)
    got, got_s = kern[0].fused_add_rms_norm_triton(
        x.to(KERNEL_DEVICE), res.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), EPS, False,
        torch.bfloat16)
    close(got_s, s, torch.float32)
    close(got, out, torch.bfloat16)


def strided_views(dtype):
    """Inputs ``[.., 24]`` that are not plain contiguous tensors."""
    base = torch.randn(4, 6, 40, dtype=dtype)
    return {
        "row_slice": base[:, 1, 8:32],  # [4, 24], row stride 240
        "leading_3d": base[:, :3, :24],  # [4, 3, 24], dims not mergeable into a view
        "transposed": torch.randn(24, 5, dtype=dtype).t(),  # [5, 24], last-dim stride 5
        "one_dim": base[0, 0, :24],  # [24]
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_strided_inputs(kern, dtype):
    w = torch.randn(24, dtype=dtype)
    for name, x in strided_views(dtype).items():
        eager = eager_rms_norm(x, w, EPS, True, dtype)
        op = torch.ops.infer.rms_norm(x, w, EPS, True, dtype)
        assert op.is_contiguous(), name
        torch.testing.assert_close(op, eager, rtol=0, atol=0, msg=name)
        close(kern[0].rms_norm_triton(x.to(KERNEL_DEVICE),
                                      w.to(KERNEL_DEVICE), EPS, True, dtype), eager)
        res = torch.randn(x.shape, dtype=dtype).transpose(0, -1).contiguous().transpose(0, -1)
        got, got_s = kern[0].fused_add_rms_norm_triton(x.to(KERNEL_DEVICE),
                                                       res.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE),
                                                       EPS, True, dtype)
        close(got_s, x + res)
        close(got, eager_rms_norm(x + res, w, EPS, True, dtype))


# ---------------------------------------------------------------- silu_and_mul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("packed", [True, False])
def test_silu_and_mul(kern, dtype, hidden, rows, packed):
    if packed:  # gate/up are column slices of one [T, 2I] buffer
        buf = torch.randn(rows, 2 * hidden, dtype=dtype) * 3
        gate, up = buf[:, :hidden], buf[:, hidden:]
    else:
        gate, up = (torch.randn(rows, hidden, dtype=dtype) * 3 for _ in range(2))
    eager = eager_silu_and_mul(gate, up)
    op = torch.ops.infer.silu_and_mul(gate, up)
    assert op.is_contiguous()
    torch.testing.assert_close(op, eager, rtol=0, atol=0)
    if packed:
        buf = buf.to(KERNEL_DEVICE)
        got = kern[1].silu_and_mul_triton(buf[:, :hidden], buf[:, hidden:])
    else:
        got = kern[1].silu_and_mul_triton(gate.to(KERNEL_DEVICE), up.to(KERNEL_DEVICE))
    close(got, eager)


def test_silu_and_mul_3d_and_mixed(kern):
    buf = torch.randn(2, 3, 2 * 1100, dtype=torch.bfloat16)  # [B, S, 2I], I > one block
    gate, up = buf[..., :1100], buf[..., 1100:]
    eager = eager_silu_and_mul(gate, up)
    torch.testing.assert_close(torch.ops.infer.silu_and_mul(gate, up), eager, rtol=0, atol=0)
    dbuf = buf.to(KERNEL_DEVICE)
    close(kern[1].silu_and_mul_triton(dbuf[..., :1100], dbuf[..., 1100:]), eager)
    up32 = torch.randn(2, 3, 1100)
    eager = eager_silu_and_mul(gate, up32)
    assert eager.dtype == torch.float32
    torch.testing.assert_close(torch.ops.infer.silu_and_mul(gate, up32), eager, rtol=0, atol=0)
    close(kern[1].silu_and_mul_triton(dbuf[..., :1100], up32.to(KERNEL_DEVICE)), eager,
          torch.bfloat16)


# ---------------------------------------------------------------- errors, registration, compile
def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.infer.rms_norm(x, torch.randn(7), EPS, True, torch.float32)
    with pytest.raises(ValueError, match="at least 1 dim"):
        torch.ops.infer.rms_norm(torch.tensor(1.0), None, EPS, True, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        torch.ops.infer.rms_norm(x, None, EPS, True, torch.int32)
    with pytest.raises(ValueError, match="residual of x's shape"):
        torch.ops.infer.fused_add_rms_norm(x, torch.randn(8), None, EPS, True, torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.infer.silu_and_mul(x, torch.randn(2, 7))


def test_opcheck():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(8, dtype=torch.bfloat16)
    buf = torch.randn(3, 16)
    torch.library.opcheck(torch.ops.infer.rms_norm.default, (x, w, EPS, True, torch.bfloat16))
    torch.library.opcheck(torch.ops.infer.rms_norm.default, (x, None, EPS, False, torch.float32))
    torch.library.opcheck(torch.ops.infer.fused_add_rms_norm.default,
                          (x, x.float(), w, EPS, True, torch.float32))
    torch.library.opcheck(torch.ops.infer.silu_and_mul.default, (buf[:, :8], buf[:, 8:]))


def _mlp_block(x, res, w, buf):
    h, res = torch.ops.infer.fused_add_rms_norm(x, res, w, EPS, True, x.dtype)
    h = torch.ops.infer.rms_norm(h * 2, w, EPS, False, torch.float32)
    act = torch.ops.infer.silu_and_mul(buf[:, :8], buf[:, 8:])
    return h + 1, res, act


@pytest.mark.parametrize("backend", ["eager", "aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """The ops trace under Dynamo (fullgraph), AOT functionalization and Inductor (extern)."""
    x, res = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    w, buf = torch.randn(8, dtype=torch.bfloat16), torch.randn(3, 16)
    compiled = torch.compile(_mlp_block, backend=backend, fullgraph=True, dynamic=True)
    for got, ref in zip(compiled(x, res, w, buf), _mlp_block(x, res, w, buf)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- GPU, real shapes
GPU_SHAPES = [(4096, 4096), (1, 4096), (7, 5000), (3, 65536 + 17), (129, 96)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_shapes(shape, dtype):
    rows, hidden = shape
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device="cuda")
    for cbw in (True, False):
        close(torch.ops.infer.rms_norm(x, w, EPS, cbw, dtype),
              eager_rms_norm(x, w, EPS, cbw, dtype))
        out, s = torch.ops.infer.fused_add_rms_norm(x, res, w, EPS, cbw, dtype)
        close(s, x + res)
        close(out, eager_rms_norm(x + res, w, EPS, cbw, dtype))
    close(torch.ops.infer.rms_norm(x, None, EPS, False, torch.float32),
          eager_rms_norm(x, None, EPS, False, torch.float32), dtype)
    buf = torch.randn(rows, 2 * hidden, dtype=dtype, device="cuda")
    gate, up = buf[:, :hidden], buf[:, hidden:]
    close(torch.ops.infer.silu_and_mul(gate, up), eager_silu_and_mul(gate, up))


# ---------------------------------------------------------------- one kernel variant per shape
class _Launches:
    """Stands in for a Triton kernel: keeps the constexprs and options of every launch."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()

        self.pdl: list[bool] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            pdl = kwargs.pop("USE_PDL", False)
            assert kwargs.pop("launch_pdl", False) == pdl  # the constexpr and the launch flag agree
            self.pdl.append(pdl)
            self.seen.add(tuple(sorted(kwargs.items())))
        return launch


@pytest.mark.parametrize("hidden", [8, 128, 1024, 4096])
def test_launch_parameters_do_not_depend_on_token_count(kern, monkeypatch, hidden):
    """CUDA-graph capture runs every capture size: each must reuse one compiled variant (apart
    from the PDL flag, which tells decode-sized steps from larger ones)."""
    norm, act = kern
    norm_launches, act_launches = _Launches(), _Launches()
    monkeypatch.setattr(norm, "_rms_norm_kernel", norm_launches)
    monkeypatch.setattr(act, "_silu_and_mul_kernel", act_launches)
    for rows in (1, 2, 3, 8, 16, 24, 100, 256):
        x = torch.randn(rows, hidden)  # [T, H]
        norm.rms_norm_triton(x, None, EPS, True, x.dtype)
        norm.fused_add_rms_norm_triton(x, x, None, EPS, True, x.dtype)
        act.silu_and_mul_triton(x, x)
    assert len(norm_launches.seen) == 2  # with and without the residual
    assert len(act_launches.seen) == 1


def test_decode_sized_launches_join_the_pdl_chain(kern, monkeypatch):
    """On a PDL device, norms and SiLU-and-mul of at most PDL_MAX_ROWS rows launch with PDL (they sit
    between GEMVs that trigger their dependents early); larger ones, after cuBLAS GEMMs, do not."""
    from infer.runtime.kernels import pdl
    norm, act = kern
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device: True)
    norm_launches, act_launches = _Launches(), _Launches()
    monkeypatch.setattr(norm, "_rms_norm_kernel", norm_launches)
    monkeypatch.setattr(act, "_silu_and_mul_kernel", act_launches)
    for rows in (1, pdl.PDL_MAX_ROWS, pdl.PDL_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        norm.rms_norm_triton(x, None, EPS, True, x.dtype)
        norm.fused_add_rms_norm_triton(x, x, None, EPS, True, x.dtype)
        act.silu_and_mul_triton(x, x)
    assert norm_launches.pdl == [True, True, True, True, False, False]
    assert act_launches.pdl == [True, True, False]
