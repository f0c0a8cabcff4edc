"""``infer::silu_and_mul``: the gated MLP activation ``silu(gate) * up``.

Matches the eager spelling ``F.silu(gate) * up`` including its rounding points::

    s = silu(gate.float()).to(gate.dtype)
    out = (s.float() * up.float()).to(torch.promote_types(gate.dtype, up.dtype))

``gate`` and ``up`` share one shape ``[..., I]`` and may be column slices of one packed
``[T, 2*I]`` buffer; the CUDA (Triton) path reads them in place through their row strides.
Every other device runs the plain-torch reference. The output is contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SCHEMA = "(Tensor gate, Tensor up) -> Tensor"


def _check_args(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``gate`` and ``up`` are same-shape float tensors."""
    if gate.dim() < 1:
        raise ValueError(f"silu_and_mul needs gate with at least 1 dim, got shape "
                         f"{tuple(gate.shape)}")
    if gate.shape != up.shape:
        raise ValueError(f"silu_and_mul needs gate and up of one shape, got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    if not (gate.is_floating_point() and up.is_floating_point()):
        raise ValueError(f"silu_and_mul needs floating-point inputs, got {gate.dtype} and "
                         f"{up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"silu_and_mul gate is on {gate.device} but up is on {up.device}")


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``silu(gate) * up`` with the op's rounding points; ``[..., I]``."""
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    s = F.silu(gate.float()).to(gate.dtype)  # [..., I]
    return (s.float() * up.float()).to(out_dtype).contiguous()  # [..., I]


@torch.library.custom_op("infer::silu_and_mul", mutates_args=(), schema=_SCHEMA)
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; see the module docstring for the exact rounding."""
    _check_args(gate, up)
    return silu_and_mul_ref(gate, up)


@silu_and_mul.register_kernel("cuda")
def _silu_and_mul_cuda(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_args(gate, up)
    from ..kernels.activation_triton import silu_and_mul_triton
    return silu_and_mul_triton(gate, up)


@silu_and_mul.register_fake
def _silu_and_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_args(gate, up)
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))
