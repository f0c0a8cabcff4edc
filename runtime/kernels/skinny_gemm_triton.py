"""Triton GEMM for decode batches of a few dozen rows: ``y[M, N] = a[M, K] @ W[N, K].T (+ bias)``.

At 3-64 rows a projection of a small model is latency bound: cuBLAS reads a 2-12 MB weight in
5-7.5 us, a third of it at the copy rate (H200). This kernel computes ``y.T`` tile by tile
("swap AB"): each program takes ``BLOCK_N`` weight rows (the MMA's M side) against all rows of
``a`` (its N side), over ``K / SPLIT_K`` columns. It launches with PDL and issues its first weight
tile before the PDL wait (weights are never written during a step), so its start overlaps the
kernel before it: that, not the streaming rate, is what it wins in a step.

- Loads go through TMA descriptors (``TMA``) or plain pointers; OOB rows of ``a`` read as zeros.
- With ``SPLIT_K > 1`` every program stores an fp32 partial, counts itself in on its column tile's
  arrival counter and the last one in sums the partials in split order (deterministic), writes
  ``y`` and resets the counter: no second launch.

A SiLU-and-mul prologue (as the GEMV has) was measured and dropped: every program recomputes the
activation of all rows over its K range, 64 times the work at 16-row tiles, so the SiLU kernel +
this GEMM is faster (``python -m infer.benchmarks.skinny_gemm``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .counters import arrival_counters
from .pdl import pdl_launch_options
from .launch import launch

MAX_ROWS = 64  # rows of a (the MMA's N side is padded to a power of two >= 16)
DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int  # weight rows per program (16, 32 or 64)
    block_k: int  # columns per load
    split_k: int  # programs sharing one column tile's K
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = True


@triton.jit
def _load_tile(src, ptr, stride, rows, r0, k, M, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """``[len(rows), BLOCK_K]`` tile at rows ``r0 + rows``, columns ``k..k+BLOCK_K`` (rows >= M read 0)."""
    if TMA:
        return src.load([r0, k])
    cols = k + tl.arange(0, BLOCK_K)
    return tl.load(ptr + (r0 + rows)[:, None].to(tl.int64) * stride + cols[None, :],
                   mask=(r0 + rows)[:, None] < M, other=0.0)


@triton.jit
def _dot(w, a, acc, DOT_F32: tl.constexpr):
    """``acc + w @ a.T``. ``DOT_F32`` (the Triton interpreter, whose bf16 ``tl.dot`` is wrong) multiplies
    in fp32: products of 16-bit floats are exact there, so only the summation order differs."""
    if DOT_F32:
        return tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(w, tl.trans(a), acc)


@triton.jit(do_not_specialize=["M"])  # one compiled variant per row bucket, not two
def _skinny_gemm_kernel(
    a_src, w_src, a_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counter_ptr, M, N, K_SPLIT, stride_a, stride_w, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    TMA: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * K_SPLIT
    wrows = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    w = _load_tile(w_src, w_ptr, stride_w, wrows, n0, k0, N, BLOCK_K, TMA)  # [BN, BK], before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # a is written by an earlier kernel
    a = _load_tile(a_src, a_ptr, stride_a, rows, 0, k0, M, BLOCK_K, TMA)  # [BM, BK]
    acc = _dot(w, a, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_F32)  # [BN, BM]: y.T
    for kk in range(BLOCK_K, K_SPLIT, BLOCK_K):  # pipelined over the launch's num_stages
        w = _load_tile(w_src, w_ptr, stride_w, wrows, n0, k0 + kk, N, BLOCK_K, TMA)
        a = _load_tile(a_src, a_ptr, stride_a, rows, 0, k0 + kk, M, BLOCK_K, TMA)
        acc = _dot(w, a, acc, DOT_F32)

    n = n0 + wrows
    y_mask = (n[:, None] < N) & (rows[None, :] < M)
    y_ptrs = y_ptr + rows[None, :] * stride_y + n[:, None]  # [BN, BM]
    if SPLIT_K > 1:
        part = part_ptr + n[:, None].to(tl.int64) * BLOCK_M + rows[None, :]  # partials [SPLIT_K, N, BM]
        tl.store(part + pid_k * N * BLOCK_M, acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial is issued before the program counts itself in
        if tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu") != SPLIT_K - 1:
            return
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):  # in split order, whichever program came last
            acc += tl.load(part + s * N * BLOCK_M, mask=y_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + pid_n, 0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _aligned(t: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base and row stride, unit column stride."""
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def supports(a: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the op layer runs ``a [M, K] @ weight[N, K].T`` here: CUDA, ``0 < M <= MAX_ROWS``,
    bf16/fp16 throughout, TMA-aligned rows, and a shape measured faster than cuBLAS (``TUNED``).
    Unmeasured shapes (other models, tensor-parallel shards, 8B-sized weights) stay on cuBLAS:
    :func:`rule_config`'s tiles lost to it on three of SmolLM2's four projections."""
    if not (a.is_cuda and a.dim() == 2 and 0 < a.shape[0] <= MAX_ROWS and a.dtype in DTYPES):
        return False
    if tuned_config(a.shape[0], *weight.shape) is None:
        return False
    tensors = [a, weight] + [t for t in others if t is not None]
    return all(t.dtype == a.dtype for t in tensors) and all(_aligned(t) for t in tensors if t.dim() == 2)


# (rows rounded up to 16/32/64, N, K) -> (block_n, block_k, split_k, num_warps, num_stages, tma), or
# None where cuBLAS measured faster: the best tile of H200 sweeps (28-layer chains in one CUDA
# graph) for the projections of Qwen3-0.6B and of SmolLM2-135M, the embedded default model.
# Re-tune: ``python -m infer.benchmarks.skinny_gemm --sweep``.
TUNED: dict[tuple[int, int, int], tuple[int, int, int, int, int, bool] | None] = {
    (16, 4096, 1024): (32, 512, 1, 4, 3, True), (16, 1024, 2048): (32, 512, 4, 4, 3, True),
    (16, 6144, 1024): (64, 256, 1, 4, 3, True), (16, 1024, 3072): (64, 256, 4, 4, 4, True),
    (32, 4096, 1024): (32, 512, 1, 4, 4, True), (32, 1024, 2048): (32, 512, 4, 4, 3, True),
    (32, 6144, 1024): (64, 256, 1, 4, 3, True), (32, 1024, 3072): (64, 256, 4, 4, 3, True),
    (64, 4096, 1024): (16, 256, 1, 4, 3, True), (64, 1024, 2048): (32, 512, 4, 8, 3, True),
    (64, 6144, 1024): (64, 128, 1, 4, 4, True), (64, 1024, 3072): (16, 256, 4, 4, 3, True),
    **{(rows, n, k): cfg for rows in (16, 32, 64) for (n, k), cfg in {
        (960, 576): (16, 64, 1, 4, 3, False), (576, 576): (16, 64, 1, 4, 3, False),
        (3072, 576): None,  # cuBLAS 4.2-4.4 us against 4.4-5.2 us for the best tile
        (576, 1536): (16, 512, 1, 4, 3, True)}.items()},
}
MIN_PROGRAMS = 128  # the tuned tiles launch 64-256 programs


def tuned_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The tuned tile of a shape measured faster than cuBLAS, else None."""
    tuned = TUNED.get((max(16, triton.next_power_of_2(m)), n, k))
    return None if tuned is None else SkinnyConfig(*tuned)


def choose_config(m: int, n: int, k: int) -> SkinnyConfig:
    """The tuned tile where there is one, else :func:`rule_config` (direct calls, sweeps)."""
    return tuned_config(m, n, k) or rule_config(m, n, k)


def rule_config(m: int, n: int, k: int) -> SkinnyConfig:
    """The pattern of the tuned tiles: weight tiles of at most 16K elements (8K at 64 rows, where the
    tile of ``a`` is larger), the widest columns that divide the split, the fewest K splits (then
    the widest row tiles) that launch ``MIN_PROGRAMS`` programs, or else the most programs."""
    tile = 16384 if m <= 32 else 8192
    candidates = []  # (programs, config) in order of preference
    for split in (1, 2, 4, 8):
        block_k = next((b for b in (512, 256, 128, 64) if k % (split * b) == 0), None)
        if block_k is None:
            continue
        for block_n in (64, 32, 16):
            if block_n * block_k <= tile and n % block_n == 0:
                candidates.append(((n // block_n) * split, SkinnyConfig(block_n, block_k, split)))
    enough = [c for p, c in candidates if p >= MIN_PROGRAMS]
    return enough[0] if enough else max(candidates, key=lambda pc: pc[0])[1]


def skinny_gemm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: SkinnyConfig | None = None) -> torch.Tensor:
    """``a @ weight.T (+ bias)`` -> ``[M, N]`` in ``weight.dtype``; inputs validated by the op layer
    and accepted by :func:`supports` (on CPU the Triton interpreter runs it, for any config)."""
    m, k = a.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}")
    y = torch.empty(m, n, dtype=weight.dtype, device=a.device)
    if m == 0 or n == 0:
        return y
    cfg = config or choose_config(m, n, k)
    if n % cfg.block_n or k % (cfg.split_k * cfg.block_k):
        raise ValueError(f"config {cfg} does not tile a [{n}, {k}] weight")
    counters = arrival_counters(a.device, n // cfg.block_n) if cfg.split_k > 1 else None
    split = cfg.split_k if counters is not None else 1  # no combine while capturing a new buffer
    block_m = max(16, triton.next_power_of_2(m))
    part = torch.empty(split, n, block_m, dtype=torch.float32, device=a.device) if split > 1 else y
    if cfg.tma:
        srcs = (TensorDescriptor.from_tensor(a, [block_m, cfg.block_k]),
                TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]))
    else:
        srcs = (a, weight)
    guard = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    with guard:
        launch(_skinny_gemm_kernel, (n // cfg.block_n, split))(
            *srcs, a, weight, bias if bias is not None else y, y, part, counters if counters is not None else y,
            m, n, k // split, a.stride(0), weight.stride(0), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
            TMA=cfg.tma, HAS_BIAS=bias is not None, DOT_F32=not a.is_cuda, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **pdl_launch_options(a.device),
        )
    return y
