"""Triton ``silu(gate) * up`` kernel.

``gate`` and ``up`` are read in place through their row strides, so column slices of one
packed ``[T, 2*I]`` gate_up projection output cost no copy. The tile follows from the row length
alone and ``n_rows`` is not specialized: two compiled variants serve every token count (with PDL
up to ``pdl.PDL_MAX_ROWS`` rows, as the RMSNorm kernel). Rounding
follows the eager spelling documented in :mod:`infer.runtime.ops.activation`. The launcher runs
on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .pdl import PDL_MAX_ROWS, pdl_launch_options
from .launch import launch

_MAX_BLOCK = 1024  # columns per program
_TILE = 2048  # target elements per program (several rows when the rows are short)
_ELEMS_PER_WARP = 256


@triton.jit(do_not_specialize=["n_rows"])
def _silu_and_mul_kernel(g_ptr, u_ptr, out_ptr, n_rows, n_cols, g_stride, u_stride,
                         out_stride, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # gate and up are written by the kernel before
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # [ROWS, 1]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]  # [1, BLOCK]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)  # eager silu
    tl.store(out_ptr + rows * out_stride + cols, (s * u).to(out_ptr.dtype.element_ty),
             mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``[rows, t.shape[-1]]`` with unit column stride (copies only if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # view whenever the leading dims can be merged


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``, ``up`` of one shape ``[..., I]``; contiguous output.

    The result dtype is ``torch.promote_types(gate.dtype, up.dtype)``. Inputs are assumed
    validated by the op layer.
    """
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if out.numel() == 0:
        return out
    n_cols = gate.shape[-1]
    g2, u2 = _as_rows(gate), _as_rows(up)  # [T, I] each, row strides may differ
    out2 = out.view(-1, n_cols)  # [T, I]
    n_rows = g2.shape[0]
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    rows_per_prog = max(1, _TILE // block)  # from the row length only: one variant for every T
    num_warps = max(1, min(rows_per_prog * block // _ELEMS_PER_WARP, 8))
    grid = (triton.cdiv(n_rows, rows_per_prog), triton.cdiv(n_cols, block))
    guard = torch.cuda.device(gate.device) if gate.is_cuda else contextlib.nullcontext()
    with guard:
        launch(_silu_and_mul_kernel, grid)(g2, u2, out2, n_rows, n_cols, g2.stride(0), u2.stride(0),
                                   out2.stride(0), ROWS=rows_per_prog, BLOCK=block,
                                   num_warps=num_warps,
                                   **pdl_launch_options(gate.device, enable=n_rows <= PDL_MAX_ROWS))
    return out
