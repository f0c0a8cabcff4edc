"""Triton kernel for rotary embedding of q and k, optionally after a per-head RMSNorm.

One launch covers both tensors: program ``(t, g)`` owns token ``t`` and a block of ``BLOCK_H``
heads, the first ``cdiv(Hq, BLOCK_H)`` blocks of q and then those of k. A head row is read once,
as its two rotary halves ``x1 = x[:R/2]``, ``x2 = x[R/2:R]`` (each output half is formed from
both in registers) and the tail ``x[R:]``, which passes through.

Rounding follows the eager spellings exactly (:mod:`infer.runtime.ops.rotary`): the optional
norm as in :mod:`infer.runtime.ops.norm`, then ``cos``/``sin`` cast to the rotated dtype and each
product and the sum rounded to it. Under the interpreter, whose bf16 cast truncates, rounding to
bf16 is done by hand (to nearest even, as the GPU's conversion does). fp32 would otherwise let the compiler contract
``a * c + b * s`` into an FMA, so the launch turns FP fusion off. The launcher runs on CPU
tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import PDL_MAX_ROWS, pdl_launch_options
from .launch import launch

_TILE = 2048  # target elements per program
_ELEMS_PER_WARP = 256


@dataclass(frozen=True, slots=True)
class NormArgs:
    """The arguments of ``infer::rms_norm`` besides its input."""

    weight: torch.Tensor | None
    eps: float
    cast_before_weight: bool
    out_dtype: torch.dtype


@triton.jit
def _round(x, DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (to nearest even), returned as fp32.

    The GPU's conversion rounds to nearest even; the interpreter's bf16 cast truncates, so there
    (``BY_HAND``) bf16 is rounded on the bits."""
    if BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _normalized(h, inv, w_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """``rms_norm``'s output for the fp32 input ``h``, rounded to ``OUT_DTYPE`` (held as fp32)."""
    y = h * inv
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if CAST_BEFORE_WEIGHT:
            y = _round(y, IN_DTYPE, BY_HAND)
        y = y * w
    return _round(y, OUT_DTYPE, BY_HAND)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, w_ptr, cos, sin, tok, head0, n_heads, head_dim, half, s_tok, s_head, s_dim, eps,
                  NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BY_HAND: tl.constexpr):
    """Heads ``[head0, head0 + BLOCK_H)`` of token ``tok``: optional norm, then rotary.

    A head row is held as its two rotary halves ``x1 = x[:half]``, ``x2 = x[half:2 half]`` and the
    pass-through tail ``x[2 half:]`` (``BLOCK_TAIL == 0``: none), each read once."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    in_dtype: tl.constexpr = x_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    i = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    h_mask = heads < n_heads
    mask = h_mask & (i < half)  # [BH, BHALF]
    row = x_ptr + tok * s_tok + heads * s_head  # [BH, 1]
    x1 = tl.load(row + i * s_dim, mask=mask, other=0.0).to(tl.float32)  # [BH, BHALF]
    x2 = tl.load(row + (half + i) * s_dim, mask=mask, other=0.0).to(tl.float32)  # [BH, BHALF]
    ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # [BH]
    if BLOCK_TAIL > 0:
        j = 2 * half + tl.arange(0, BLOCK_TAIL)[None, :]  # [1, BTAIL]
        t_mask = h_mask & (j < head_dim)
        xt = tl.load(row + j * s_dim, mask=t_mask, other=0.0).to(tl.float32)  # [BH, BTAIL]
        ss += tl.sum(xt * xt, axis=1)
    if NORM:
        inv = tl.rsqrt(ss / head_dim + eps)[:, None]  # [BH, 1], as the rms_norm kernel
        x1 = _normalized(x1, inv, w_ptr, i, i < half, HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype, dtype, BY_HAND)
        x2 = _normalized(x2, inv, w_ptr, half + i, i < half, HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype, dtype,
                         BY_HAND)
        if BLOCK_TAIL > 0:
            xt = _normalized(xt, inv, w_ptr, j, j < head_dim, HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype, dtype,
                             BY_HAND)
    c, s = _round(cos, dtype, BY_HAND), _round(sin, dtype, BY_HAND)  # [1, BHALF]
    out1 = _round(_round(x1 * c, dtype, BY_HAND) - _round(x2 * s, dtype, BY_HAND), dtype, BY_HAND)  # x1 c - x2 s
    out2 = _round(_round(x2 * c, dtype, BY_HAND) + _round(x1 * s, dtype, BY_HAND), dtype, BY_HAND)  # x2 c + x1 s
    out_row = out_ptr + (tok * n_heads + heads) * head_dim  # [BH, 1], contiguous output
    tl.store(out_row + i, out1.to(dtype), mask=mask)
    tl.store(out_row + half + i, out2.to(dtype), mask=mask)
    if BLOCK_TAIL > 0:
        tl.store(out_row + j, xt.to(dtype), mask=t_mask)


@triton.jit
def _qk_rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                      n_q_heads, n_k_heads, head_dim, half, q_s0, q_s1, q_s2, k_s0, k_s1, k_s2,
                      cos_s0, cos_s1, sin_s0, sin_s1, q_eps, k_eps,
                      NORM: tl.constexpr, Q_WEIGHT: tl.constexpr, K_WEIGHT: tl.constexpr,
                      Q_CAST: tl.constexpr, K_CAST: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BY_HAND: tl.constexpr,
                      USE_PDL: tl.constexpr):
    if USE_PDL:  # everything below reads what earlier kernels wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    i = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    cos = tl.load(cos_ptr + tok * cos_s0 + i * cos_s1, mask=i < half, other=0.0).to(tl.float32)  # [1, BHALF]
    sin = tl.load(sin_ptr + tok * sin_s0 + i * sin_s1, mask=i < half, other=0.0).to(tl.float32)  # [1, BHALF]
    q_groups = tl.cdiv(n_q_heads, BLOCK_H)
    if group < q_groups:
        _rotate_heads(q_ptr, q_out_ptr, qw_ptr, cos, sin, tok, group * BLOCK_H, n_q_heads, head_dim, half,
                      q_s0, q_s1, q_s2, q_eps, NORM, Q_WEIGHT, Q_CAST, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, BY_HAND)
    else:
        _rotate_heads(k_ptr, k_out_ptr, kw_ptr, cos, sin, tok, (group - q_groups) * BLOCK_H, n_k_heads, head_dim,
                      half, k_s0, k_s1, k_s2, k_eps, NORM, K_WEIGHT, K_CAST, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, BY_HAND)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def qk_rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_norm: NormArgs | None = None, k_norm: NormArgs | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` by ``cos/sin [T, R/2]``, each after
    its RMSNorm over ``D`` when ``q_norm``/``k_norm`` are given (both or neither).

    Inputs may have any strides; outputs are contiguous, in the norm's ``out_dtype`` (else the
    input's dtype). Inputs are assumed validated by the op layer.
    """
    if (q_norm is None) != (k_norm is None):
        raise ValueError("qk_rotary_triton takes both q_norm and k_norm or neither")
    q_out = torch.empty(q.shape, dtype=q.dtype if q_norm is None else q_norm.out_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype if k_norm is None else k_norm.out_dtype, device=k.device)
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads, half = k.shape[1], cos.shape[1]
    block_half = triton.next_power_of_2(max(half, 1))
    tail = head_dim - 2 * half
    block_tail = triton.next_power_of_2(tail) if tail > 0 else 0
    # Heads per program: the smaller head count (k's under GQA) rounded up to a power of two, so
    # k's programs hold no masked-off rows; at most about _TILE elements.
    per_head = 2 * block_half + block_tail
    block_h = min(triton.next_power_of_2(max(min(n_q_heads, n_k_heads), 1)), max(1, _TILE // per_head))
    groups = triton.cdiv(n_q_heads, block_h) + triton.cdiv(n_k_heads, block_h)
    if n_tokens == 0 or groups == 0:
        return q_out, k_out
    q_w = None if q_norm is None else q_norm.weight
    k_w = None if k_norm is None else k_norm.weight
    num_warps = max(1, min(8, block_h * per_head // _ELEMS_PER_WARP))
    with _device_guard(q):
        launch(_qk_rotary_kernel, (n_tokens, groups))(
            q, k, q_out, k_out, q if q_w is None else q_w.contiguous(), k if k_w is None else k_w.contiguous(),
            cos, sin, n_q_heads, n_k_heads, head_dim, half, *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
            0.0 if q_norm is None else q_norm.eps, 0.0 if k_norm is None else k_norm.eps,
            NORM=q_norm is not None, Q_WEIGHT=q_w is not None, K_WEIGHT=k_w is not None,
            Q_CAST=q_norm is not None and q_norm.cast_before_weight,
            K_CAST=k_norm is not None and k_norm.cast_before_weight,
            BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BY_HAND=not q.is_cuda,
            num_warps=num_warps, enable_fp_fusion=False,
            **pdl_launch_options(q.device, enable=n_tokens <= PDL_MAX_ROWS))
    return q_out, k_out
