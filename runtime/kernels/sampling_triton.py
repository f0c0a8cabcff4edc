"""Triton Gumbel-max sampling: one token per row at a shared temperature, the logits read once.

The exponential race ``argmax_v p[v] / E[v]`` with ``E ~ Exp(1)`` draws ``v`` with probability
``p[v]``; for ``p = softmax(x / T)`` it is ``argmax_v x[v] - T * log E[v]`` (Gumbel-max), which
needs neither the softmax nor the division. Each program streams a range of one row in 1-D tiles,
makes the noise in registers, one element from its own counter (no layout shuffles), and keeps a
running argmax per lane; ties go to the lowest index. With few rows the vocab is split over several
programs per row and a second tiny kernel reduces their ``(score, index)`` pairs.

Noise: the 32-bit word of element ``v`` of row ``r`` is ``mix(m * v + a)`` (mod 2^32), ``mix`` the
``lowbias32`` finalizer (2 multiplies, 3 xor-shifts; a bijection with avalanche bias 0.17) and
``(m odd, a)`` a 63-bit key hashed once per program from the 64-bit seed and ``r``: the SplitMix
construction (a Weyl sequence through a murmur-style finalizer) with one stream per row. It costs
9 integer ops per element against ~15 for Philox4x32-10 (4 words per counter) and keeps each word
a function of (seed, row, index) only. Two rows or seeds read ``mix`` on two arithmetic
progressions with unrelated odd steps, which share ~``V^2 / 2^32`` points at scattered indices, as
many equal words as two independent streams would have; an XOR- or add-key (``mix(v ^ k)``)
would instead make one row a shifted copy of another whenever the keys differ by less than ``V``.
The tests bound equal draws across seeds and rows and the correlation of neighbouring uniforms.

From the word ``k``, ``w = (k + 1/2) / 2^32`` and ``E = -log(1 - w)``: the tokens that win against
the odds have small ``E``, which come from small ``w``, held by fp32 with full relative precision
(6 terms of the series stand for the log below ``SERIES_MAX``). On CUDA both logs are the hardware
``lg2.approx`` (absolute error ~2^-22 near 1: relative error < 3e-6 in ``E`` above ``SERIES_MAX``);
the precise software log2 cost ~20 instructions each. :func:`reference_sample` recomputes it all in
plain torch.

The launchers run on CPU tensors under ``TRITON_INTERPRET=1`` (with the precise log).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tuning import sm_count
from ... import envs
from .launch import launch


LN2 = math.log(2.0)
SERIES_MAX = 2.0 ** -4  # below it 6 terms of -log(1 - w) = w + w^2/2 + ... (relative error < 1e-8)
W_MAX = 1.0 - 2.0 ** -24  # largest fp32 below 1
MIX_MUL = (0x7FEB352D, 0x846CA68B)  # lowbias32 (C. Wellons, "Prospecting for hash functions")
_LN2: tl.constexpr = tl.constexpr(LN2)
_SERIES_MAX: tl.constexpr = tl.constexpr(SERIES_MAX)
_W_MAX: tl.constexpr = tl.constexpr(W_MAX)
_MIX_MUL0: tl.constexpr = tl.constexpr(MIX_MUL[0])
_MIX_MUL1: tl.constexpr = tl.constexpr(MIX_MUL[1])
_NO_INDEX: tl.constexpr = tl.constexpr(2 ** 31 - 1)
SEED_BIT = 1 << 62  # always set: the seed is then typed int64 by Triton (no recompiles), 62 random bits
PROGRAMS_PER_SM = 4  # split target: rows * splits ~ this many programs per SM


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """``block`` elements per tile (a power of 2, >= 8), ``splits`` programs per row."""

    block: int
    splits: int
    num_warps: int


@triton.jit
def _mix(x):
    """lowbias32 of ``uint32`` ``x``: a bijection of 32-bit words."""
    x ^= x >> 16
    x *= _MIX_MUL0
    x ^= x >> 15
    x *= _MIX_MUL1
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, row):
    """The stream ``(m, a)`` of ``row``: odd multiplier and offset, from both seed words."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    t = _mix(row.to(tl.uint32) ^ _mix(lo ^ _mix(hi)))
    return t | 1, _mix(t ^ hi)


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    if FAST_LOG:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _exponential(m, a, v, FAST_LOG: tl.constexpr):
    """``Exp(1)`` noise of the elements ``v`` (int32) of the row keyed ``(m, a)``."""
    k = _mix(v.to(tl.uint32) * m + a)
    w = k.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (k + 1/2) / 2^32
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * (0.25 + w * (0.2 + w * 0.16666666666666666)))))
    logged = -_LN2 * _log2(1.0 - tl.minimum(w, _W_MAX), FAST_LOG)
    return tl.where(w < _SERIES_MAX, series, logged)


@triton.jit(do_not_specialize=["seed", "chunks_per_split"])
def _gumbel_argmax_kernel(x_ptr, val_ptr, idx_ptr, out_ptr, seed, scale, stride, V, chunks_per_split,
                          BLOCK: tl.constexpr, SPLIT: tl.constexpr, FAST_LOG: tl.constexpr):
    """Program ``(row, split)``: the best ``x - scale * log2(E)`` (``scale = T ln 2``) of its range."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    m, a = _row_key(seed, row)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride
    start = split * chunks_per_split * BLOCK
    end = tl.minimum(start + chunks_per_split * BLOCK, V)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = start + cols  # an all -inf range answers its first index, as torch.argmax does
    for base in range(start, end, BLOCK):
        v = base + cols
        x = tl.load(x_row + v, mask=v < end, other=float("-inf")).to(tl.float32)
        score = x - scale * _log2(_exponential(m, a, v, FAST_LOG), FAST_LOG)
        take = score > best  # strict: a lane keeps its earliest (lowest) index on ties
        best = tl.where(take, score, best)
        best_idx = tl.where(take, v, best_idx)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, _NO_INDEX), 0)
    if SPLIT:
        tl.store(val_ptr + row * tl.num_programs(1) + split, top)
        tl.store(idx_ptr + row * tl.num_programs(1) + split, idx)
    else:
        tl.store(out_ptr + row, idx.to(tl.int64))


@triton.jit(do_not_specialize=["splits"])
def _argmax_splits_kernel(val_ptr, idx_ptr, out_ptr, splits, BLOCK_S: tl.constexpr):
    """One row: the index of the best split's score, ties to the earlier split (the lower index)."""
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_S)
    mask = k < splits
    val = tl.load(val_ptr + row * splits + k, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * splits + k, mask=mask, other=_NO_INDEX)
    top = tl.max(val, 0)
    tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, _NO_INDEX), 0).to(tl.int64))


@triton.jit
def _noise_kernel(out_ptr, seed, V, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    """Debug: the noise ``[rows, V]`` that :func:`_gumbel_argmax_kernel` draws."""
    row = tl.program_id(0)
    m, a = _row_key(seed, row)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * V + v, _exponential(m, a, v, FAST_LOG), mask=v < V)


def choose_config(rows: int, vocab: int, device: torch.device) -> SamplingConfig:
    """2K-element tiles, and enough programs per row for ``PROGRAMS_PER_SM`` programs per SM
    (1K tiles when even one tile per program leaves SMs idle, as at one row)."""
    if device.type != "cuda":
        return SamplingConfig(block=min(256, max(8, triton.next_power_of_2(vocab))), splits=1, num_warps=1)
    target = PROGRAMS_PER_SM * sm_count(device)
    block = 2048 if rows * triton.cdiv(vocab, 2048) >= target else 1024
    chunks = triton.cdiv(vocab, block)
    per_split = triton.cdiv(chunks, triton.cdiv(target, rows))
    return SamplingConfig(block=block, splits=triton.cdiv(chunks, per_split), num_warps=4)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A noise seed from torch's CPU RNG (the global one unless ``generator``): reproducible under
    ``torch.manual_seed``, and each call advances it."""
    return int(torch.randint(SEED_BIT, (), generator=generator, device="cpu")) | SEED_BIT


def _fast_log(t: torch.Tensor) -> bool:
    """Whether the kernels use ``lg2.approx`` (compiled CUDA) rather than the precise log (interpreter)."""
    return t.is_cuda and not envs.triton_interpret()


def gumbel_sample(logits: torch.Tensor, temperature: float, seed: int,
                  config: SamplingConfig | None = None) -> torch.Tensor:
    """One token per row of ``logits [N, V]`` (fp32/bf16/fp16) drawn from ``softmax(logits / T)``.

    Returns ``[N] int64`` ids. ``temperature > 0``; ``seed`` keys the noise (:func:`draw_seed`).
    Only the last dim must be contiguous.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n, vocab = logits.shape
    if vocab >= 2 ** 31 - 1:
        raise ValueError(f"vocab must be below 2**31 - 1, got {vocab}")
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if vocab == 0:
        raise ValueError("logits must have at least one column")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cfg = config or choose_config(n, vocab, logits.device)
    if cfg.block < 8 or cfg.block & (cfg.block - 1) or cfg.splits < 1:
        raise ValueError(f"config needs a power-of-2 block >= 8 and splits >= 1, got {cfg}")
    per_split = triton.cdiv(triton.cdiv(vocab, cfg.block), cfg.splits)
    splits = triton.cdiv(triton.cdiv(vocab, cfg.block), per_split)  # no empty splits
    val = torch.empty(n, splits, dtype=torch.float32, device=logits.device) if splits > 1 else None
    idx = torch.empty(n, splits, dtype=torch.int32, device=logits.device) if splits > 1 else None
    guard = torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext()
    with guard:
        launch(_gumbel_argmax_kernel, (n, splits))(
            logits, val if val is not None else out, idx if idx is not None else out, out,
            seed, temperature * LN2, logits.stride(0), vocab, per_split,
            BLOCK=cfg.block, SPLIT=splits > 1, FAST_LOG=_fast_log(logits), num_warps=cfg.num_warps)
        if splits > 1:
            # BLOCK_S covers the most splits this vocab and tile can have, not this batch's count:
            # one compiled variant serves every batch size (a new one mid-generation cost ~0.1 s).
            most = triton.next_power_of_2(triton.cdiv(vocab, cfg.block))
            launch(_argmax_splits_kernel, (n,))(val, idx, out, splits, BLOCK_S=most, num_warps=1)
    return out


def kernel_exponential(seed: int, rows: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """Debug: the ``Exp(1)`` noise ``[rows, vocab]`` (fp32) the kernel draws for ``seed``."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    guard = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with guard:
        launch(_noise_kernel, (rows, triton.cdiv(vocab, 64)))(out, seed, vocab, BLOCK=64, FAST_LOG=_fast_log(out),
                                                      num_warps=1)
    return out


# ---------------------------------------------------------------- plain-torch reference

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64-held uint32 ``x`` and a 32-bit ``c`` (or tensor), in 16-bit
    halves of ``c`` so that no product leaves int64."""
    hi, lo = (c >> 16) & 0xFFFF, c & 0xFFFF
    return ((((x * hi) & 0xFFFF) << 16) + x * lo) & _MASK32


def reference_mix(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` of int64-held uint32 ``x``, as the kernel computes it."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL[1])
    return x ^ (x >> 16)


def reference_bits(seed: int, rows: int, vocab: int) -> torch.Tensor:
    """The kernel's 32-bit words ``[rows, vocab]`` (int64-held) for ``seed``."""
    lo, hi = torch.tensor(seed & _MASK32), torch.tensor((seed >> 32) & _MASK32)
    t = reference_mix(torch.arange(rows, dtype=torch.int64) ^ reference_mix(lo ^ reference_mix(hi)))  # [rows]
    m, a = (t | 1)[:, None], reference_mix(t ^ hi)[:, None]
    v = torch.arange(vocab, dtype=torch.int64)
    return reference_mix((_mul32(v, m) + a) & _MASK32)  # [rows, vocab]


def reference_exponential(seed: int, rows: int, vocab: int) -> torch.Tensor:
    """The kernel's ``Exp(1)`` noise ``[rows, vocab]`` (fp32, CPU) for ``seed``."""
    w = reference_bits(seed, rows, vocab).to(torch.float32) * 2.0 ** -32 + 2.0 ** -33
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0))))))
    logged = -LN2 * torch.log2(1.0 - w.clamp(max=W_MAX))
    return torch.where(w < SERIES_MAX, series, logged)


def reference_sample(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """:func:`gumbel_sample` in plain torch on the same noise (CPU ``[N] int64``)."""
    x = logits.detach().float().cpu()
    scale = torch.tensor(temperature * LN2, dtype=torch.float32)
    return (x - scale * torch.log2(reference_exponential(seed, *x.shape))).argmax(dim=-1)
