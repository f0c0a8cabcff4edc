"""Triton skinny GEMM ("GEMV") for a few rows, with an optional fused prologue.

``y[m, n] = sum_k a[m, k] * W[n, k] (+ bias[n])`` for ``M <= MAX_ROWS`` rows and a row-major
weight ``W [N, K]`` (an ``nn.Linear`` weight). Decode steps at small batch are weight-bandwidth
bound; this kernel streams ``W`` once, in ``[BLOCK_N, BLOCK_K]`` tiles, with every row of ``a``
applied to each tile, and accumulates in fp32 like a GEMM.

The prologue forms ``a`` from the kernel's inputs, with the rounding points of the ops it
replaces, so fusing it changes nothing but the summation order of the dot product:

- ``NONE``: ``a = x``;
- ``RMS``: ``a = infer::rms_norm(x, norm_weight, eps, cast_before_weight, dtype)``;
- ``ADD_RMS``: ``s = x + residual`` (rounded, stored by the first program), ``a = rms_norm(s)``;
- ``SILU_MUL``: ``a = infer::silu_and_mul(x, x2)`` (``x2`` is the up half).

Every program recomputes the (tiny) prologue for its tile; only the weight is streamed once.
The launchers run on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options
from .launch import launch

MAX_ROWS = 8  # most rows the kernel takes; callers fall back to a GEMM above this
LARGE_WEIGHT = 16 << 20  # elements: from here on a weight takes the 8B-sized configs (choose_config)
NONE, RMS, ADD_RMS, SILU_MUL = 0, 1, 2, 3
# Every GEMV launches with PDL: the next projection streams its first weight tile while the one
# before drains, for small and 8B-sized weights alike. Re-measure: ``python -m infer.benchmarks.gemv``
# (``INFER_PDL=0`` for the chain without it).
PROLOGUES = {"none": NONE, "rms": RMS, "add_rms": ADD_RMS, "silu_mul": SILU_MUL}


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    w_evict: str = ""  # eviction policy of the weight loads ("" or "evict_first")


@triton.jit
def _load_a(x_ptr, x2_ptr, r_ptr, rows, cols, mask, stride_x, stride_x2, stride_r, PROLOGUE: tl.constexpr):
    """fp32 input chunk before normalization: x, x + residual (rounded), or silu(x) * x2 (rounded)."""
    h = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if PROLOGUE == 2:
        r = tl.load(r_ptr + rows * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(r_ptr.dtype.element_ty)
    if PROLOGUE == 3:
        u = tl.load(x2_ptr + rows * stride_x2 + cols, mask=mask, other=0.0).to(tl.float32)
        g = h.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)  # eager silu, rounded
        h = (s * u).to(x_ptr.dtype.element_ty)
    return h.to(tl.float32)


@triton.jit
def _row_input(x_ptr, x2_ptr, r_ptr, nw_ptr, w_ptr, row, cols, mask, inv, stride_x, stride_x2, stride_r,
               PROLOGUE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr):
    """The GEMM input of one row chunk ``[1, BK]`` in fp32, exactly as the unfused ops round it."""
    a = _load_a(x_ptr, x2_ptr, r_ptr, row, cols, mask, stride_x, stride_x2, stride_r, PROLOGUE)
    if PROLOGUE == 1 or PROLOGUE == 2:
        a = a * inv
        if HAS_NORM_WEIGHT:
            if CAST_BEFORE_WEIGHT:
                a = a.to(x_ptr.dtype.element_ty).to(tl.float32)
            a = a * tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        a = a.to(w_ptr.dtype.element_ty).to(tl.float32)  # the norm's output dtype
    return a


@triton.jit(do_not_specialize=["M", "stride_x", "stride_x2", "stride_r", "stride_y", "stride_s"])
def _gemv_kernel(
    x_ptr, x2_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, s_ptr,
    M, N, eps, stride_x, stride_x2, stride_r, stride_y, stride_s, stride_w,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr, W_EVICT: tl.constexpr = "",
):
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    rows = m[:, None].to(tl.int64)  # [BM, 1]
    m_mask = rows < M
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_w  # [BN, 1]
    # The first weight tile depends on no earlier kernel: its loads go out before the PDL wait.
    cols_first = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    w_first = tl.load(w_rows + cols_first, mask=n_mask[:, None] & (cols_first < K), other=0.0,
                      eviction_policy=W_EVICT)  # [BN, BK]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # inputs below are written by earlier kernels

    inv = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1 or PROLOGUE == 2:  # 1 / rms of every row first (the rows are tiny)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            cols = (k0 + tl.arange(0, BLOCK_K))[None, :]
            mask = m_mask & (cols < K)
            h = _load_a(x_ptr, x2_ptr, r_ptr, rows, cols, mask, stride_x, stride_x2, stride_r, PROLOGUE)
            if PROLOGUE == 2:
                if pid == 0:
                    tl.store(s_ptr + rows * stride_s + cols, h.to(s_ptr.dtype.element_ty), mask=mask)
            ss += tl.sum(h * h, 1)
        inv = tl.rsqrt(ss / K + eps)  # [BM]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K))[None, :]  # [1, BK]
        if k0 == 0:
            w = w_first.to(tl.float32)
        else:
            w = tl.load(w_rows + cols, mask=n_mask[:, None] & (cols < K), other=0.0,
                        eviction_policy=W_EVICT).to(tl.float32)  # [BN, BK]
        for mi in tl.static_range(BLOCK_M):  # the weight tile is loaded once for every row
            inv_i = tl.sum(tl.where(m == mi, inv, 0.0), 0)
            row_ok = (cols < K) & (cols * 0 + mi < M)
            a = _row_input(x_ptr, x2_ptr, r_ptr, nw_ptr, w_ptr, mi, cols, row_ok, inv_i,
                           stride_x, stride_x2, stride_r, PROLOGUE, HAS_NORM_WEIGHT, CAST_BEFORE_WEIGHT)
            part = tl.sum(w * a, 1)  # [BN]
            acc += tl.where(rows == mi, part[None, :], 0.0)

    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


def choose_config(m: int, n: int, k: int, device: torch.device, prologue: str = "none") -> GemvConfig:
    """Four weight rows per program and 1-2K columns per load: the best tiles of an H200 sweep
    (``python -m infer.benchmarks.gemv --sweep``). Narrow tiles give the most programs in flight;
    wider ones (8-16 rows, which would amortize a prologue) measured 15-65% slower per step, since
    the fp32 tile then leaves fewer loads in flight per SM.

    8B-sized weights (at least ``LARGE_WEIGHT`` elements, rows of 4096 or more) load with
    ``evict_first`` (streamed once: they should not push the step's activations out of L2), and
    for one row take 2 weight rows x 4096 columns per program, 8 warps: the best tile summed over an
    8B layer's four projections; at two rows and more that tile loses and the hint alone stays."""
    if device.type != "cuda":
        return GemvConfig(block_n=4, block_k=min(64, triton.next_power_of_2(k)), num_warps=1)
    block_k = min(triton.next_power_of_2(k), 2048 if k > 1024 else 1024)
    if n * k < LARGE_WEIGHT or k < 4096:
        return GemvConfig(block_n=4, block_k=block_k, num_warps=4 if n * k < LARGE_WEIGHT else 2)
    if m == 1:  # k >= 4096 here
        return GemvConfig(block_n=2, block_k=4096, num_warps=8, w_evict="evict_first")
    return GemvConfig(block_n=4, block_k=block_k, num_warps=2, w_evict="evict_first")


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: str = "none",
    x2: torch.Tensor | None = None, residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, cast_before_weight: bool = False,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prologue(x, ...) @ weight.T (+ bias)`` for ``x [M, K]``, ``M <= MAX_ROWS``.

    Returns ``(y [M, N], s)``: ``s`` is ``x + residual`` for the ``"add_rms"`` prologue, else None.
    Inputs are assumed validated by the op layer (same device, ``weight`` row-major).
    """
    mode = PROLOGUES[prologue]
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    s = torch.empty(m, k, dtype=residual.dtype, device=x.device) if mode == ADD_RMS else None
    if m == 0 or n == 0:
        return y, s
    cfg = config or choose_config(m, n, k, x.device, prologue)
    x2_ = x2 if x2 is not None else x
    r_ = residual if residual is not None else x
    s_ = s if s is not None else y
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        launch(_gemv_kernel, (triton.cdiv(n, cfg.block_n),))(
            x, x2_, r_, norm_weight if norm_weight is not None else weight, weight,
            bias if bias is not None else weight, y, s_,
            m, n, eps, x.stride(0), x2_.stride(0), r_.stride(0), y.stride(0), s_.stride(0), weight.stride(0),
            K=k, BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            PROLOGUE=mode, HAS_NORM_WEIGHT=norm_weight is not None, CAST_BEFORE_WEIGHT=cast_before_weight,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps, W_EVICT=cfg.w_evict,
            **pdl_launch_options(x.device),
        )
    return y, s
