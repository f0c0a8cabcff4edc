"""Linear layers with a fused prologue: ``infer::linear``, ``rms_norm_linear``,
``add_rms_norm_linear`` and ``silu_mul_linear``.

The ``gemv`` pass puts these where a projection reads a norm, a residual add + norm, or the
gated activation. Each computes exactly its unfused chain (same ops, same rounding points)::

    linear(x, W, b)                              = x @ W.T + b
    rms_norm_linear(x, nw, eps, c, dt, W, b)     = linear(rms_norm(x, nw, eps, c, dt), W, b)
    add_rms_norm_linear(x, r, nw, eps, c, dt, W, b) = (linear(n, W, b), s)
                                                   where (n, s) = fused_add_rms_norm(x, r, nw, eps, c, dt)
    silu_mul_linear(g, u, W, b)                  = linear(silu_and_mul(g, u), W, b)

On CUDA, a batch of at most ``GEMV_MAX_ROWS`` rows (decode at small batch) runs one Triton kernel
that streams the weight once and forms its input on the fly (:mod:`infer.runtime.kernels.gemv_triton`).
Up to ``SKINNY_MAX_ROWS`` rows, weights whose shape was measured faster than cuBLAS go through the
Triton skinny GEMM (:mod:`infer.runtime.kernels.skinny_gemm_triton`), after the prologue's own
kernel. Larger batches run the unfused chain (Triton prologue, cuBLAS GEMM). Every other device
runs the plain-torch chain. The choice depends on the row count and the tensors' shapes and
alignment only, so a CUDA graph captured at one batch size always replays the same kernels.
``KernelConfig.skinny_gemm`` (``INFER_SKINNY_GEMM=0``) keeps cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.tuning import kernel_config
from . import packed_linear
from .activation import _check_args as _check_silu_args, silu_and_mul_ref
from .norm import _check_residual, _check_rms_args, fused_add_rms_norm_ref, rms_norm_ref

GEMV_MAX_ROWS = 2  # above this cuBLAS wins (H200: the kernel re-streams x per row); <= gemv_triton.MAX_ROWS
# A fused prologue re-reads its inputs in every program of the GEMV: it pays off while weights are
# small (Qwen3-0.6B projections, 2-6M elements); for 8B-sized weights the unfused chain is faster.
PROLOGUE_MAX_WEIGHT = 8 << 20
_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SKINNY_MAX_ROWS = 64  # = skinny_gemm_triton.MAX_ROWS (checked here before triton is imported)

_NORM_ARGS = "Tensor? norm_weight, float eps, bool cast_before_weight, ScalarType norm_dtype"
_LINEAR_ARGS = "Tensor weight, Tensor? bias"


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, what: str,
                  dtype: torch.dtype | None = None) -> None:
    """Raise ``ValueError`` unless ``x [M, K] @ weight[N, K].T + bias[N]`` is well formed.

    ``dtype``: the GEMM input's dtype when a prologue produces it (else ``x.dtype``)."""
    if x.dim() != 2:
        raise ValueError(f"{what} needs a 2-d input [M, K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{what} needs weight [N, K={x.shape[1]}], got {tuple(weight.shape)}")
    dtype = dtype or x.dtype
    if dtype != weight.dtype:
        raise ValueError(f"{what}: input dtype {dtype} differs from weight dtype {weight.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{what} needs bias [N={weight.shape[0]}], got {tuple(bias.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{what}: weight is on {weight.device} but the input is on {x.device}")


def _use_gemv(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None, prologue: bool = True) -> bool:
    """The Triton kernel runs for few rows of row-major CUDA tensors of one supported dtype (with a
    prologue, only for weights of at most ``PROLOGUE_MAX_WEIGHT`` elements)."""
    if not (x.is_cuda and 0 < x.shape[0] <= GEMV_MAX_ROWS and weight.stride(1) == 1):
        return False
    if prologue and weight.numel() > PROLOGUE_MAX_WEIGHT:
        return False
    tensors = [x, weight] + [t for t in others if t is not None]
    return x.dtype in _GEMV_DTYPES and all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors)


def _use_skinny(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """The Triton skinny GEMM runs for ``GEMV_MAX_ROWS < M <= SKINNY_MAX_ROWS`` rows of tensors it tiles."""
    if not (x.is_cuda and kernel_config().skinny_gemm and GEMV_MAX_ROWS < x.shape[0] <= SKINNY_MAX_ROWS):
        return False
    from ..kernels.skinny_gemm_triton import supports  # lazy: triton is imported on first CUDA use
    return supports(x, weight, *others)


def _skinny(*args, **kwargs):
    from ..kernels.skinny_gemm_triton import skinny_gemm
    return skinny_gemm(*args, **kwargs)


def _gemv(*args, **kwargs):
    from ..kernels.gemv_triton import gemv  # lazy: triton is imported on first CUDA use
    return gemv(*args, **kwargs)


def _empty_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("infer::linear", mutates_args=(), schema=f"(Tensor x, {_LINEAR_ARGS}) -> Tensor")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T + bias`` -> ``[M, N]``."""
    _check_linear(x, weight, bias, "linear")
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton GEMV for a few rows, the Triton skinny GEMM for a few dozen, cuBLAS otherwise; on the
    CPU, oneDNN from the weight's packed copy where there is one."""
    if x.device.type == "cpu":
        return packed_linear.linear(x, weight, bias)
    if _use_gemv(x, weight, bias, prologue=False):
        return _gemv(x, weight, bias)[0]
    if _use_skinny(x, weight, bias):
        return _skinny(x, weight, bias)
    return packed_linear.linear(x, weight, bias)  # F.linear, from a packed copy of the weight if there is one


@linear.register_fake
def _linear_fake(x, weight, bias):
    _check_linear(x, weight, bias, "linear")
    return _empty_out(x, weight)


@torch.library.custom_op("infer::rms_norm_linear", mutates_args=(),
                         schema=f"(Tensor x, {_NORM_ARGS}, {_LINEAR_ARGS}) -> Tensor")
def rms_norm_linear(x, norm_weight, eps, cast_before_weight, norm_dtype, weight, bias):
    """``linear(rms_norm(x, ...), weight, bias)``."""
    _check_rms_args(x, norm_weight, eps, norm_dtype)
    _check_linear(x, weight, bias, "rms_norm_linear", norm_dtype)
    if x.dtype == norm_dtype and _use_gemv(x, weight, bias, norm_weight):
        return _gemv(x, weight, bias, prologue="rms", norm_weight=norm_weight, eps=eps,
                     cast_before_weight=cast_before_weight)[0]
    return _linear(torch.ops.infer.rms_norm(x, norm_weight, eps, cast_before_weight, norm_dtype), weight, bias)


@rms_norm_linear.register_fake
def _rms_norm_linear_fake(x, norm_weight, eps, cast_before_weight, norm_dtype, weight, bias):
    _check_rms_args(x, norm_weight, eps, norm_dtype)
    return _empty_out(x, weight)


@torch.library.custom_op("infer::add_rms_norm_linear", mutates_args=(),
                         schema=f"(Tensor x, Tensor residual, {_NORM_ARGS}, {_LINEAR_ARGS}) -> (Tensor, Tensor)")
def add_rms_norm_linear(x, residual, norm_weight, eps, cast_before_weight, norm_dtype, weight, bias):
    """``(linear(n, weight, bias), s)`` with ``(n, s) = fused_add_rms_norm(x, residual, ...)``."""
    _check_residual(x, residual)
    _check_rms_args(x, norm_weight, eps, norm_dtype)
    _check_linear(x, weight, bias, "add_rms_norm_linear", norm_dtype)
    if x.dtype == norm_dtype and _use_gemv(x, weight, bias, norm_weight, residual):
        y, s = _gemv(x, weight, bias, prologue="add_rms", residual=residual, norm_weight=norm_weight, eps=eps,
                     cast_before_weight=cast_before_weight)
        return y, s
    normed, s = torch.ops.infer.fused_add_rms_norm(x, residual, norm_weight, eps, cast_before_weight, norm_dtype)
    return _linear(normed, weight, bias), s


@add_rms_norm_linear.register_fake
def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, cast_before_weight, norm_dtype, weight, bias):
    _check_residual(x, residual)
    _check_rms_args(x, norm_weight, eps, norm_dtype)
    return _empty_out(x, weight), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))


@torch.library.custom_op("infer::silu_mul_linear", mutates_args=(),
                         schema=f"(Tensor gate, Tensor up, {_LINEAR_ARGS}) -> Tensor")
def silu_mul_linear(gate, up, weight, bias):
    """``linear(silu_and_mul(gate, up), weight, bias)`` for ``gate``/``up`` ``[M, I]``."""
    _check_silu_args(gate, up)
    _check_linear(gate, weight, bias, "silu_mul_linear", torch.promote_types(gate.dtype, up.dtype))
    if gate.dim() == 2 and _use_gemv(gate, weight, bias, up):
        return _gemv(gate, weight, bias, prologue="silu_mul", x2=up)[0]
    return _linear(torch.ops.infer.silu_and_mul(gate, up), weight, bias)


@silu_mul_linear.register_fake
def _silu_mul_linear_fake(gate, up, weight, bias):
    _check_silu_args(gate, up)
    return _empty_out(gate, weight)


def reference(name: str, *args) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch chain an op stands for (tests compare against it)."""
    if name == "linear":
        x, w, b = args
        return F.linear(x, w, b)
    if name == "rms_norm_linear":
        x, nw, eps, c, dt, w, b = args
        return F.linear(rms_norm_ref(x, nw, eps, c, dt), w, b)
    if name == "add_rms_norm_linear":
        x, r, nw, eps, c, dt, w, b = args
        normed, s = fused_add_rms_norm_ref(x, r, nw, eps, c, dt)
        return F.linear(normed, w, b), s
    if name == "silu_mul_linear":
        g, u, w, b = args
        return F.linear(silu_and_mul_ref(g, u), w, b)
    raise ValueError(f"unknown fused linear {name!r}")
