"""``infer::rms_norm`` and ``infer::fused_add_rms_norm`` custom ops.

The fusion passes replace eager RMSNorm spellings with these ops, so both compute exactly
the eager function, with the same rounding points (all arithmetic in fp32)::

    h = x.float()
    y = h * rsqrt(mean(h * h, -1, keepdim=True) + eps)
    weight is None:           out = y.to(out_dtype)
    cast_before_weight:       out = (y.to(x.dtype).float() * weight.float()).to(out_dtype)
    not cast_before_weight:   out = (y * weight.float()).to(out_dtype)

``cast_before_weight=True`` is Hugging Face Llama's ``weight * hidden.to(input_dtype)``:
the float product rounded once equals eager's bf16/fp16 multiply. ``fused_add_rms_norm``
first forms ``s = x + residual`` in the promoted dtype (the eager add) and returns
``(rms_norm(s, ...), s)`` without mutating anything.

CUDA tensors run the Triton kernel; every other device runs the plain-torch reference.
Outputs are always contiguous.
"""

from __future__ import annotations

import torch

_SCHEMA_RMS = ("(Tensor x, Tensor? weight, float eps, bool cast_before_weight, "
               "ScalarType out_dtype) -> Tensor")
_SCHEMA_ADD_RMS = ("(Tensor x, Tensor residual, Tensor? weight, float eps, "
                   "bool cast_before_weight, ScalarType out_dtype) -> (Tensor, Tensor)")


def _check_rms_args(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                    out_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless the arguments describe a valid RMSNorm over ``x[..., H]``."""
    if x.dim() < 1:
        raise ValueError(f"rms_norm needs x with at least 1 dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"rms_norm needs a floating-point x, got {x.dtype}")
    if not out_dtype.is_floating_point:
        raise ValueError(f"rms_norm out_dtype must be floating point, got {out_dtype}")
    if not eps >= 0.0:
        raise ValueError(f"rms_norm eps must be >= 0, got {eps}")
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm weight must have shape [{x.shape[-1]}] (x's last dim), "
                         f"got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"rms_norm weight must be floating point, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm weight is on {weight.device} but x is on {x.device}")


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm needs residual of x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    if not residual.is_floating_point():
        raise ValueError(f"fused_add_rms_norm residual must be floating point, got "
                         f"{residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"fused_add_rms_norm residual is on {residual.device} but x is on "
                         f"{x.device}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 cast_before_weight: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain-torch RMSNorm with the op's rounding points; ``x`` ``[..., H]`` -> ``[..., H]``."""
    h = x.float()  # [..., H]
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [..., H] fp32
    if weight is None:
        out = y.to(out_dtype)
    elif cast_before_weight:
        out = (y.to(x.dtype).float() * weight.float()).to(out_dtype)
    else:
        out = (y * weight.float()).to(out_dtype)
    return out.contiguous()


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor,
                           weight: torch.Tensor | None, eps: float, cast_before_weight: bool,
                           out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``s = x + residual; (rms_norm(s), s)``, both ``[..., H]`` contiguous."""
    s = (x + residual).contiguous()  # [..., H], promoted dtype
    return rms_norm_ref(s, weight, eps, cast_before_weight, out_dtype), s


@torch.library.custom_op("infer::rms_norm", mutates_args=(), schema=_SCHEMA_RMS)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             cast_before_weight: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim; see the module docstring for the exact formula."""
    _check_rms_args(x, weight, eps, out_dtype)
    return rms_norm_ref(x, weight, eps, cast_before_weight, out_dtype)


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   cast_before_weight: bool, out_dtype: torch.dtype) -> torch.Tensor:
    _check_rms_args(x, weight, eps, out_dtype)
    from ..kernels.norm_triton import rms_norm_triton
    return rms_norm_triton(x, weight, eps, cast_before_weight, out_dtype)


@rms_norm.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   cast_before_weight: bool, out_dtype: torch.dtype) -> torch.Tensor:
    _check_rms_args(x, weight, eps, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("infer::fused_add_rms_norm", mutates_args=(), schema=_SCHEMA_ADD_RMS)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float, cast_before_weight: bool, out_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual``; returns ``(rms_norm(s, ...), s)``. Functional, no mutation."""
    _check_residual(x, residual)
    _check_rms_args(x, weight, eps, out_dtype)
    return fused_add_rms_norm_ref(x, residual, weight, eps, cast_before_weight, out_dtype)


@fused_add_rms_norm.register_kernel("cuda")
def _fused_add_rms_norm_cuda(x: torch.Tensor, residual: torch.Tensor,
                             weight: torch.Tensor | None, eps: float, cast_before_weight: bool,
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _check_residual(x, residual)
    _check_rms_args(x, weight, eps, out_dtype)
    from ..kernels.norm_triton import fused_add_rms_norm_triton
    return fused_add_rms_norm_triton(x, residual, weight, eps, cast_before_weight, out_dtype)


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x: torch.Tensor, residual: torch.Tensor,
                             weight: torch.Tensor | None, eps: float, cast_before_weight: bool,
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _check_residual(x, residual)
    _check_rms_args(x, weight, eps, out_dtype)
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=s_dtype)
