"""Triton Gumbel-max sampling: one token per row at a shared temperature, the logits read once.

The exponential race ``argmax_v p[v] / E[v]`` with ``E ~ Exp(1)`` draws ``v`` with probability
``p[v]``; for ``p = softmax(x / T)`` it is ``argmax_v x[v] - T * log E[v]`` (Gumbel-max), which
needs neither the softmax nor the division. Each program streams a range of one row in
``[BLOCK/4, 4]`` tiles, makes the noise in registers and keeps a running argmax per lane; ties go
to the lowest index. With few rows the vocab is split over several programs per row and a second
tiny kernel reduces their ``(score, index)`` pairs.

Noise: element ``v`` of row ``r`` takes word ``v % 4`` of Philox4x32-10 keyed on the 64-bit seed
at counter ``(v // 4, r, 0, 0)``, so it depends on the seed, its row and its index only (not on
the tiling or the split). From the word ``k``, ``w = (k + 1/2) / 2^32`` and ``E = -log(1 - w)``:
the tokens that win against the odds have small ``E``, which come from small ``w``, held by fp32
with full relative precision (a series stands for the log there). :func:`reference_sample`
recomputes all of it in plain torch.

The launchers run on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


LN2 = math.log(2.0)
SERIES_MAX = 2.0 ** -6  # below it 4 terms of -log(1 - w) = w + w^2/2 + ... (relative error < 2e-8)
W_MAX = 1.0 - 2.0 ** -24  # largest fp32 below 1
_LN2: tl.constexpr = tl.constexpr(LN2)
_SERIES_MAX: tl.constexpr = tl.constexpr(SERIES_MAX)
_W_MAX: tl.constexpr = tl.constexpr(W_MAX)
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
def _exponential(seed, row, base, Q: tl.constexpr):
    """``Exp(1)`` noise ``[Q, 4]`` of elements ``base + 4 * i + j`` of ``row`` (``base % 4 == 0``)."""
    counter = base // 4 + tl.arange(0, Q)  # [Q]
    zero = counter * 0
    k0, k1, k2, k3 = tl.philox(seed, counter, zero + row, zero, zero)
    j = tl.arange(0, 4)[None, :]
    k = tl.where(j == 0, k0[:, None], tl.where(j == 1, k1[:, None], tl.where(j == 2, k2[:, None], k3[:, None])))
    w = k.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (k + 1/2) / 2^32, [Q, 4]
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))
    logged = -_LN2 * tl.log2(1.0 - tl.minimum(w, _W_MAX))
    return tl.where(w < _SERIES_MAX, series, logged)


@triton.jit(do_not_specialize=["seed", "stride", "chunks_per_split"])
def _gumbel_argmax_kernel(x_ptr, val_ptr, idx_ptr, out_ptr, seed, scale, stride, V, chunks_per_split,
                          BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Program ``(row, split)``: the best ``x - scale * log2(E)`` (``scale = T ln 2``) of its range."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    Q: tl.constexpr = BLOCK // 4
    cols = 4 * tl.arange(0, Q)[:, None] + tl.arange(0, 4)[None, :]  # [Q, 4] offsets in a tile
    x_row = x_ptr + row.to(tl.int64) * stride
    start = split * chunks_per_split * BLOCK
    end = tl.minimum(start + chunks_per_split * BLOCK, V)
    best = tl.full([Q, 4], float("-inf"), tl.float32)
    best_idx = start + cols  # an all -inf range answers its first index, as torch.argmax does
    for base in range(start, end, BLOCK):
        v = base + cols
        x = tl.load(x_row + v, mask=v < end, other=float("-inf")).to(tl.float32)
        score = x - scale * tl.log2(_exponential(seed, row, base, Q))
        take = score > best  # strict: a lane keeps its earliest (lowest) index on ties
        best = tl.where(take, score, best)
        best_idx = tl.where(take, v, best_idx)
    top = tl.max(tl.max(best, 1), 0)
    idx = tl.min(tl.min(tl.where(best == top, best_idx, _NO_INDEX), 1), 0)
    if SPLIT:
        tl.store(val_ptr + row * tl.num_programs(1) + split, top)
        tl.store(idx_ptr + row * tl.num_programs(1) + split, idx)
    else:
        tl.store(out_ptr + row, idx.to(tl.int64))


@triton.jit
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
def _noise_kernel(out_ptr, seed, V, BLOCK: tl.constexpr):
    """Debug: the noise ``[rows, V]`` that :func:`_gumbel_argmax_kernel` draws."""
    row = tl.program_id(0)
    base = tl.program_id(1) * BLOCK
    v = base + 4 * tl.arange(0, BLOCK // 4)[:, None] + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + row * V + v, _exponential(seed, row, base, BLOCK // 4), mask=v < V)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_config(rows: int, vocab: int, device: torch.device) -> SamplingConfig:
    """2K-element tiles, and enough programs per row for ``PROGRAMS_PER_SM`` programs per SM
    (1K tiles when even one tile per program leaves SMs idle, as at one row)."""
    if device.type != "cuda":
        return SamplingConfig(block=min(256, max(8, triton.next_power_of_2(vocab))), splits=1, num_warps=1)
    target = PROGRAMS_PER_SM * _num_sms(device)
    block = 2048 if rows * triton.cdiv(vocab, 2048) >= target else 1024
    chunks = triton.cdiv(vocab, block)
    per_split = triton.cdiv(chunks, triton.cdiv(target, rows))
    return SamplingConfig(block=block, splits=triton.cdiv(chunks, per_split), num_warps=4)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A Philox seed from torch's CPU RNG (the global one unless ``generator``): reproducible under
    ``torch.manual_seed``, and each call advances it."""
    return int(torch.randint(SEED_BIT, (), generator=generator, device="cpu")) | SEED_BIT


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
        _gumbel_argmax_kernel[(n, splits)](
            logits, val if val is not None else out, idx if idx is not None else out, out,
            seed, temperature * LN2, logits.stride(0), vocab, per_split,
            BLOCK=cfg.block, SPLIT=splits > 1, num_warps=cfg.num_warps)
        if splits > 1:
            _argmax_splits_kernel[(n,)](val, idx, out, splits, BLOCK_S=triton.next_power_of_2(splits), num_warps=1)
    return out


def kernel_exponential(seed: int, rows: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """Debug: the ``Exp(1)`` noise ``[rows, vocab]`` (fp32) the kernel draws for ``seed``."""
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    guard = torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()
    with guard:
        _noise_kernel[(rows, triton.cdiv(vocab, 64))](out, seed, vocab, BLOCK=64, num_warps=1)
    return out


# ---------------------------------------------------------------- plain-torch reference

_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant and int64-held uint32 ``b``,
    in 16-bit halves so that no product leaves int64."""
    hi_part, lo_part = (a >> 16) * b, (a & 0xFFFF) * b  # each < 2**48
    return (hi_part + (lo_part >> 16)) >> 16, (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32


def reference_philox(seed: int, counters: list[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32 words of four counter tensors (int64 holding uint32) under the 64-bit ``seed``,
    as ``tl.philox`` computes them."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = counters
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _MASK32, (k1 + _PHILOX_KEY[1]) & _MASK32
    return [c0, c1, c2, c3]


def reference_exponential(seed: int, rows: int, vocab: int) -> torch.Tensor:
    """The kernel's ``Exp(1)`` noise ``[rows, vocab]`` (fp32, CPU) for ``seed``."""
    v = torch.arange(vocab, dtype=torch.int64)
    c0 = (v // 4).expand(rows, vocab)
    c1 = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, vocab)
    zero = torch.zeros_like(c0)
    words = torch.stack(reference_philox(seed, [c0, c1, zero, zero]), dim=-1)  # [rows, vocab, 4]
    k = words.gather(-1, (v % 4).expand(rows, vocab)[..., None])[..., 0]
    w = k.to(torch.float32) * 2.0 ** -32 + 2.0 ** -33
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * 0.25)))
    logged = -LN2 * torch.log2(1.0 - w.clamp(max=W_MAX))
    return torch.where(w < SERIES_MAX, series, logged)


def reference_sample(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """:func:`gumbel_sample` in plain torch on the same noise (CPU ``[N] int64``)."""
    x = logits.detach().float().cpu()
    scale = torch.tensor(temperature * LN2, dtype=torch.float32)
    return (x - scale * torch.log2(reference_exponential(seed, *x.shape))).argmax(dim=-1)
