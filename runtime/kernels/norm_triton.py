"""Triton RMSNorm and fused residual-add + RMSNorm kernels.

One kernel serves both ops: with ``HAS_RESIDUAL`` it first forms ``s = x + residual``
(rounded to the promoted dtype, stored once) and normalizes ``s``. Each program owns a
``[ROWS, BLOCK]`` tile: many short rows per program for small hidden sizes, one row per
program for large ones. A row that fits in ``max_block`` elements is read once; longer rows
are walked in chunks twice (sum of squares, then scale and store). The tile and the warp count
follow from the row length alone and ``n_rows`` is not specialized, so every token count (each
CUDA-graph capture size) runs one of two compiled variants: with PDL up to ``pdl.PDL_MAX_ROWS``
rows, without above.

PDL: at decode sizes the norm sits between two GEMVs, which launch with PDL. Launched without it,
the norm waits for the GEMV before it to drain, and the GEMV after it launches only once the norm
has finished, so both launch latencies show. Above ``PDL_MAX_ROWS`` cuBLAS GEMMs surround it,
which do not trigger early, so it launches without PDL. Re-measure:
``python -m infer.benchmarks.step_breakdown --shape 8b --batch 1``.

All arithmetic is fp32; the rounding points follow the eager spelling documented in
:mod:`infer.runtime.ops.norm`. The launchers run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .pdl import PDL_MAX_ROWS, pdl_launch_options
from .launch import launch

MAX_FUSED_BLOCK = 16384  # longest row (elements) held in registers for the one-pass path
_TILE = 4096  # target elements per program when several short rows share one program
_ELEMS_PER_WARP = 512


@triton.jit
def _load_input(x_ptr, res_ptr, s_ptr, rows, cols, mask, x_stride, res_stride, s_stride,
                HAS_RESIDUAL: tl.constexpr):
    """Load the normalized input as fp32; with a residual, form, round and store ``x + res``."""
    h = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        s = (h + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows * s_stride + cols, s, mask=mask)
        h = s.to(tl.float32)
    return h


@triton.jit
def _scale_store(h, inv, w, out_ptr, rows, cols, mask, out_stride,
                 HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                 IN_DTYPE: tl.constexpr):
    """``out = h * inv`` (optionally cast to ``IN_DTYPE``, then times the fp32 weight ``w``), stored once."""
    y = h * inv  # [ROWS, BLOCK] fp32
    if HAS_WEIGHT:
        if CAST_BEFORE_WEIGHT:
            y = y.to(IN_DTYPE).to(tl.float32)
        y = y * w
    tl.store(out_ptr + rows * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, s_ptr,
                     n_rows, n_cols, x_stride, res_stride, out_stride, s_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     CAST_BEFORE_WEIGHT: tl.constexpr, SINGLE_PASS: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    # Without a residual the launcher passes s_ptr = x_ptr (never written), so
    # s_ptr's element type is always the dtype of the tensor being normalized.
    in_dtype: tl.constexpr = s_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # [ROWS, 1]
    row_mask = rows < n_rows
    offs = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    if SINGLE_PASS:
        col_mask = offs < n_cols
        mask = row_mask & col_mask
        w = offs * 0.0  # no weight: never read
        if HAS_WEIGHT:  # the norm weight is not written during a step: loaded before the PDL wait
            w = tl.load(w_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)  # [1, BLOCK]
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # x and the residual are written by earlier kernels
        h = _load_input(x_ptr, res_ptr, s_ptr, rows, offs, mask, x_stride, res_stride,
                        s_stride, HAS_RESIDUAL)
        inv = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)[:, None]  # [ROWS, 1]
        _scale_store(h, inv, w, out_ptr, rows, offs, mask, out_stride,
                     HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype)
    else:
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = row_mask & (cols < n_cols)
            h = _load_input(x_ptr, res_ptr, s_ptr, rows, cols, mask, x_stride, res_stride,
                            s_stride, HAS_RESIDUAL)
            acc += h * h
        inv = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)[:, None]  # [ROWS, 1]
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            col_mask = cols < n_cols
            mask = row_mask & col_mask
            if HAS_RESIDUAL:  # re-read the rounded sum this program just stored
                h = tl.load(s_ptr + rows * s_stride + cols, mask=mask, other=0.0)
            else:
                h = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0)
            w = cols * 0.0
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [1, BLOCK]
            _scale_store(h.to(tl.float32), inv, w, out_ptr, rows, cols, mask, out_stride,
                         HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``[rows, t.shape[-1]]`` with unit column stride (copies only if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])  # view whenever the leading dims can be merged


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
            eps: float, cast_before_weight: bool, out_dtype: torch.dtype,
            max_block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a positive power of two, got {max_block}")
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=s_dtype, device=x.device)
    if x.numel() == 0:
        return out, s
    n_cols = x.shape[-1]
    x2 = _as_rows(x)  # [T, H]
    r2 = x2 if residual is None else _as_rows(residual)  # [T, H]
    s2 = x2 if s is None else s.view(-1, n_cols)  # [T, H]; x2 is a never-written dtype carrier
    out2 = out.view(-1, n_cols)  # [T, H]
    w = x2 if weight is None else weight.contiguous()  # [H]
    n_rows = x2.shape[0]
    block = triton.next_power_of_2(n_cols)
    single_pass = block <= max_block
    block = min(block, max_block)
    rows_per_prog = max(1, _TILE // block)  # from the row length only: one variant for every T
    num_warps = max(1, min(rows_per_prog * block // _ELEMS_PER_WARP, 16))
    grid = (triton.cdiv(n_rows, rows_per_prog),)
    with _device_guard(x):
        launch(_rms_norm_kernel, grid)(
            x2, r2, w, out2, s2, n_rows, n_cols, x2.stride(0), r2.stride(0), out2.stride(0),
            s2.stride(0), eps, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            CAST_BEFORE_WEIGHT=cast_before_weight, SINGLE_PASS=single_pass,
            ROWS=rows_per_prog, BLOCK=block, num_warps=num_warps,
            **pdl_launch_options(x.device, enable=n_rows <= PDL_MAX_ROWS))
    return out, s


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                    cast_before_weight: bool, out_dtype: torch.dtype,
                    max_block: int = MAX_FUSED_BLOCK) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ``[..., H]``; returns a contiguous ``[..., H]``.

    ``max_block`` (a power of two) caps the elements a program holds at once; rows longer
    than it take the two-pass chunked path. Inputs are assumed validated by the op layer.
    """
    out, _ = _launch(x, None, weight, eps, cast_before_weight, out_dtype, max_block)
    return out


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor,
                              weight: torch.Tensor | None, eps: float,
                              cast_before_weight: bool, out_dtype: torch.dtype,
                              max_block: int = MAX_FUSED_BLOCK
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` then RMSNorm of ``s`` in one pass; returns ``(normed, s)``."""
    out, s = _launch(x, residual, weight, eps, cast_before_weight, out_dtype, max_block)
    assert s is not None
    return out, s
