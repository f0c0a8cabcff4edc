"""``infer::rotary_embedding`` and ``infer::qk_norm_rotary``: RoPE on q and k in one op.

``rotary_embedding(q [T, Hq, D], k [T, Hk, D], cos [T, R/2], sin [T, R/2]) -> (q_out, k_out)``
computes, for q and for k alike, exactly the model's ``apply_rotary`` (neox layout, first ``R``
dims rotated, the rest passed through), with its rounding points: ``cos``/``sin`` cast to
``x.dtype`` and every product and sum rounded to ``x.dtype``::

    x1, x2 = x[..., :R/2], x[..., R/2:R];  c, s = cos.to(x.dtype), sin.to(x.dtype)
    out = cat(x1 * c - x2 * s, x2 * c + x1 * s, x[..., R:])

``qk_norm_rotary(q, q_weight, q_eps, q_cast_before_weight, q_dtype,
k, k_weight, k_eps, k_cast_before_weight, k_dtype, cos, sin)`` is
``rotary_embedding(rms_norm(q, q_weight, ...), rms_norm(k, k_weight, ...), cos, sin)``: each
norm takes ``infer::rms_norm``'s arguments, in its order, over ``D``.

CUDA tensors of fp32/bf16/fp16 run one Triton kernel for q and k together
(:mod:`infer.runtime.kernels.rotary_triton`), bit-exact to the rotation above; the fused norm
equals ``infer::rms_norm`` up to fp32 summation order. Every other case runs the plain-torch
chain. Inputs may be strided views (heads of a packed qkv projection); outputs are contiguous.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .norm import _check_rms_args, rms_norm_ref

_NORM_ARGS = "Tensor? {0}_weight, float {0}_eps, bool {0}_cast_before_weight, ScalarType {0}_dtype"
_SCHEMA_ROTARY = "(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)"
_SCHEMA_QK_NORM = (f"(Tensor q, {_NORM_ARGS.format('q')}, Tensor k, {_NORM_ARGS.format('k')}, "
                   "Tensor cos, Tensor sin) -> (Tensor, Tensor)")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rotary_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless q/k are ``[T, H, D]`` and cos/sin ``[T, R/2]`` with ``0 < R <= D``."""
    if q.dim() != 3:
        raise ValueError(f"{what} needs q as [T, Hq, D], got shape {tuple(q.shape)}")
    tokens, _, d = q.shape
    if k.dim() != 3 or not _maybe_equal(k.shape[0], tokens) or k.shape[2] != d:
        raise ValueError(f"{what} needs k as [T={tokens}, Hk, D={d}] (q's T and D), got shape {tuple(k.shape)}")
    if cos.dim() != 2 or not _maybe_equal(cos.shape[0], tokens) or not 0 < 2 * cos.shape[1] <= d:
        raise ValueError(f"{what} needs cos as [T={tokens}, R/2] with 0 < R <= D={d}, got shape {tuple(cos.shape)}")
    if sin.dim() != 2 or sin.shape[1] != cos.shape[1] or not _maybe_equal(sin.shape[0], cos.shape[0]):
        raise ValueError(f"{what} needs sin of cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    for name, tensor in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not tensor.is_floating_point():
            raise ValueError(f"{what} needs a floating-point {name}, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{what}: {name} is on {tensor.device} but q is on {q.device}")


def _maybe_equal(a, b) -> bool:
    """``a == b`` for sizes; True when tracing cannot tell (token counts are unbacked symbols, and
    q's and cos's come from different inputs), which adds no guard."""
    return guard_or_true(a == b)


def _check_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype, name: str) -> None:
    try:
        _check_rms_args(x, weight, eps, out_dtype)
    except ValueError as e:
        raise ValueError(f"qk_norm_rotary, norm of {name}: {e}") from None


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-torch rotary of ``x [T, H, D]`` by ``cos/sin [T, R/2]``, the model's ``apply_rotary``."""
    half = cos.shape[-1]
    cos = cos.unsqueeze(1).to(x.dtype)  # [T, 1, R/2]
    sin = sin.unsqueeze(1).to(x.dtype)  # [T, 1, R/2]
    x1, x2 = x[..., :half], x[..., half : 2 * half]  # [T, H, R/2] each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, H, R]
    if 2 * half == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)  # [T, H, D]


def _use_kernel(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in present)


def _triton(*args, **kwargs):
    from ..kernels.rotary_triton import qk_rotary_triton  # lazy: triton is imported on first CUDA use
    return qk_rotary_triton(*args, **kwargs)


@torch.library.custom_op("infer::rotary_embedding", mutates_args=(), schema=_SCHEMA_ROTARY)
def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rotary_ref(q, cos, sin), rotary_ref(k, cos, sin))``; see the module docstring."""
    _check_rotary_args(q, k, cos, sin, "rotary_embedding")
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)


@rotary_embedding.register_kernel("cuda")
def _rotary_embedding_cuda(q, k, cos, sin):
    _check_rotary_args(q, k, cos, sin, "rotary_embedding")
    if _use_kernel(q, k, cos, sin):
        return _triton(q, k, cos, sin)
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)


@rotary_embedding.register_fake
def _rotary_embedding_fake(q, k, cos, sin):
    _check_rotary_args(q, k, cos, sin, "rotary_embedding")
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _check_qk_norm(q, q_weight, q_eps, q_dtype, k, k_weight, k_eps, k_dtype, cos, sin) -> None:
    _check_norm(q, q_weight, q_eps, q_dtype, "q")
    _check_norm(k, k_weight, k_eps, k_dtype, "k")
    _check_rotary_args(q, k, cos, sin, "qk_norm_rotary")


@torch.library.custom_op("infer::qk_norm_rotary", mutates_args=(), schema=_SCHEMA_QK_NORM)
def qk_norm_rotary(q, q_weight, q_eps, q_cast_before_weight, q_dtype, k, k_weight, k_eps, k_cast_before_weight,
                   k_dtype, cos, sin):
    """``rotary_embedding(rms_norm(q, ...), rms_norm(k, ...), cos, sin)``."""
    _check_qk_norm(q, q_weight, q_eps, q_dtype, k, k_weight, k_eps, k_dtype, cos, sin)
    q_normed = rms_norm_ref(q, q_weight, q_eps, q_cast_before_weight, q_dtype)  # [T, Hq, D]
    k_normed = rms_norm_ref(k, k_weight, k_eps, k_cast_before_weight, k_dtype)  # [T, Hk, D]
    return rotary_ref(q_normed, cos, sin), rotary_ref(k_normed, cos, sin)


@qk_norm_rotary.register_kernel("cuda")
def _qk_norm_rotary_cuda(q, q_weight, q_eps, q_cast_before_weight, q_dtype, k, k_weight, k_eps,
                         k_cast_before_weight, k_dtype, cos, sin):
    _check_qk_norm(q, q_weight, q_eps, q_dtype, k, k_weight, k_eps, k_dtype, cos, sin)
    dtypes_ok = q_dtype in _KERNEL_DTYPES and k_dtype in _KERNEL_DTYPES
    if dtypes_ok and _use_kernel(q, k, cos, sin, q_weight, k_weight):
        from ..kernels.rotary_triton import NormArgs
        return _triton(q, k, cos, sin, NormArgs(q_weight, q_eps, q_cast_before_weight, q_dtype),
                       NormArgs(k_weight, k_eps, k_cast_before_weight, k_dtype))
    infer = torch.ops.infer
    q_normed = infer.rms_norm(q, q_weight, q_eps, q_cast_before_weight, q_dtype)  # [T, Hq, D]
    k_normed = infer.rms_norm(k, k_weight, k_eps, k_cast_before_weight, k_dtype)  # [T, Hk, D]
    return infer.rotary_embedding(q_normed, k_normed, cos, sin)


@qk_norm_rotary.register_fake
def _qk_norm_rotary_fake(q, q_weight, q_eps, q_cast_before_weight, q_dtype, k, k_weight, k_eps,
                         k_cast_before_weight, k_dtype, cos, sin):
    _check_qk_norm(q, q_weight, q_eps, q_dtype, k, k_weight, k_eps, k_dtype, cos, sin)
    return q.new_empty(q.shape, dtype=q_dtype), k.new_empty(k.shape, dtype=k_dtype)
