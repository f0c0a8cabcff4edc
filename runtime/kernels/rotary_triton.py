"""Triton kernel for rotary embedding of q and k, optionally after a per-head RMSNorm.

One launch covers both tensors: program ``(t, g)`` owns token ``t`` and a block of ``BLOCK_H``
heads, the first ``cdiv(Hq, BLOCK_H)`` blocks of q and then those of k. A head row is read
twice, once as is and once with its rotary halves swapped (the partner of dim ``d < R/2`` is
``d + R/2`` and the other way round), so that every output element is formed in registers
from values the program already holds; dims ``>= R`` pass through.

Rounding follows the eager spellings exactly (:mod:`infer.runtime.ops.rotary`): the optional
norm as in :mod:`infer.runtime.ops.norm`, then ``cos``/``sin`` cast to the rotated dtype and each
product and the sum rounded to it. Rounding to bf16 is done by hand (round to nearest even)
because the Triton interpreter truncates. fp32 would otherwise let the compiler contract
``a * c + b * s`` into an FMA, so the launch turns FP fusion off. The launcher runs on CPU
tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options

_TILE = 2048  # target elements per program
_ELEMS_PER_WARP = 256


@dataclass(frozen=True, slots=True)
class NormArgs:
    """The arguments of ``infer::rms_norm`` besides its input."""

    weight: torch.Tensor | None
    eps: float
    cast_before_weight: bool
    out_dtype: torch.dtype


PDL_MAX_TOKENS = 64  # decode-sized steps join the PDL chain of the projections around them


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (to nearest even), returned as fp32."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _normalized(h, inv, w_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``rms_norm``'s output for the fp32 input ``h``, rounded to ``OUT_DTYPE`` (held as fp32)."""
    y = h * inv
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if CAST_BEFORE_WEIGHT:
            y = _round(y, IN_DTYPE)
        y = y * w
    return _round(y, OUT_DTYPE)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, w_ptr, cos, sin, tok, head0, n_heads, head_dim, half, s_tok, s_head, s_dim, eps,
                  NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads ``[head0, head0 + BLOCK_H)`` of token ``tok``: optional norm, then rotary."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BD]
    partner = tl.where(d < half, d + half, tl.where(d < 2 * half, d - half, d))  # [1, BD]
    col_mask = d < head_dim
    mask = (heads < n_heads) & col_mask  # [BH, BD]
    row = x_ptr + tok * s_tok + heads * s_head  # [BH, 1]
    x = tl.load(row + d * s_dim, mask=mask, other=0.0).to(tl.float32)  # [BH, BD]
    xp = tl.load(row + partner * s_dim, mask=mask, other=0.0).to(tl.float32)  # [BH, BD]
    if NORM:
        in_dtype: tl.constexpr = x_ptr.dtype.element_ty
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)[:, None]  # [BH, 1], as the rms_norm kernel
        x = _normalized(x, inv, w_ptr, d, col_mask, HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype, dtype)
        xp = _normalized(xp, inv, w_ptr, partner, col_mask, HAS_WEIGHT, CAST_BEFORE_WEIGHT, in_dtype, dtype)
    c, s = _round(cos, dtype), _round(sin, dtype)  # [1, BD]
    sign = tl.where(d < half, -1.0, 1.0)  # first half: x1*c - x2*s; second: x2*c + x1*s
    rotated = _round(_round(x * c, dtype) + sign * _round(xp * s, dtype), dtype)  # [BH, BD]
    out = tl.where(d < 2 * half, rotated, x)
    tl.store(out_ptr + (tok * n_heads + heads) * head_dim + d, out.to(dtype), mask=mask)


@triton.jit
def _qk_rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                      n_q_heads, n_k_heads, head_dim, half, q_s0, q_s1, q_s2, k_s0, k_s1, k_s2,
                      cos_s0, cos_s1, sin_s0, sin_s1, q_eps, k_eps,
                      NORM: tl.constexpr, Q_WEIGHT: tl.constexpr, K_WEIGHT: tl.constexpr,
                      Q_CAST: tl.constexpr, K_CAST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                      USE_PDL: tl.constexpr):
    if USE_PDL:  # everything below reads what earlier kernels wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BD]
    freq = tl.where(d < half, d, d - half)
    rot_mask = d < 2 * half
    cos = tl.load(cos_ptr + tok * cos_s0 + freq * cos_s1, mask=rot_mask, other=0.0).to(tl.float32)  # [1, BD]
    sin = tl.load(sin_ptr + tok * sin_s0 + freq * sin_s1, mask=rot_mask, other=0.0).to(tl.float32)  # [1, BD]
    q_groups = tl.cdiv(n_q_heads, BLOCK_H)
    if group < q_groups:
        _rotate_heads(q_ptr, q_out_ptr, qw_ptr, cos, sin, tok, group * BLOCK_H, n_q_heads, head_dim, half,
                      q_s0, q_s1, q_s2, q_eps, NORM, Q_WEIGHT, Q_CAST, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(k_ptr, k_out_ptr, kw_ptr, cos, sin, tok, (group - q_groups) * BLOCK_H, n_k_heads, head_dim,
                      half, k_s0, k_s1, k_s2, k_eps, NORM, K_WEIGHT, K_CAST, BLOCK_H, BLOCK_D)


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
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(max(n_q_heads, n_k_heads, 1)), max(1, _TILE // block_d))
    groups = triton.cdiv(n_q_heads, block_h) + triton.cdiv(n_k_heads, block_h)
    if n_tokens == 0 or groups == 0:
        return q_out, k_out
    q_w = None if q_norm is None else q_norm.weight
    k_w = None if k_norm is None else k_norm.weight
    num_warps = max(1, min(8, block_h * block_d // _ELEMS_PER_WARP))
    with _device_guard(q):
        _qk_rotary_kernel[(n_tokens, groups)](
            q, k, q_out, k_out, q if q_w is None else q_w.contiguous(), k if k_w is None else k_w.contiguous(),
            cos, sin, n_q_heads, n_k_heads, head_dim, half, *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
            0.0 if q_norm is None else q_norm.eps, 0.0 if k_norm is None else k_norm.eps,
            NORM=q_norm is not None, Q_WEIGHT=q_w is not None, K_WEIGHT=k_w is not None,
            Q_CAST=q_norm is not None and q_norm.cast_before_weight,
            K_CAST=k_norm is not None and k_norm.cast_before_weight,
            BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=num_warps, enable_fp_fusion=False,
            **pdl_launch_options(q.device, enable=n_tokens <= PDL_MAX_TOKENS))
    return q_out, k_out
