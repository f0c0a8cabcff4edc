"""Next-token sampling: greedy, temperature, top-k, top-p, with optional per-request generators.

Random rows use the exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` draws a token with
probability ``p``. A row whose request has a generator takes its noise from that generator
alone, so a seeded request gives the same tokens whatever else is in the batch.

On CUDA, a batch whose rows all share one temperature, with no top-k / top-p and the global RNG
(the common case), takes one Triton kernel (:mod:`..kernels.sampling_triton`): the same race in
its Gumbel-max form, with noise keyed on a seed drawn from torch's CPU RNG, the logits read once.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch
from torch import Tensor

from .sampling import SamplingParams

KERNEL_DEVICE_TYPES = ("cuda",)  # devices whose temperature-only shared rows take the Triton kernel
# Fewest rows that take the kernel. H200, vocab 151,936, bf16, per call: 155 vs 726 us at 256 rows,
# 146 vs 233 us at 64; at 1-8 rows both take ~120-130 us, nearly all of it host time.
KERNEL_MIN_ROWS = 64
NON_FINITE_TOKEN = -1  # the "token" of a row whose logits hold NaN or Inf
MIN_TEMPERATURE = 1e-5  # smaller positive temperatures would overflow the scaled logits to inf


@torch.inference_mode()
def sample(logits: Tensor, params: SequenceABC[SamplingParams],
           generators: SequenceABC[torch.Generator | None] | None = None) -> Tensor:
    """Pick one token per row.

    Args:
        logits: ``[N, V]`` float logits (fp32, bf16 or fp16; computed in float32).
        params: ``N`` sampling parameters, one per row.
        generators: ``N`` generators or ``None`` (``None`` entries and ``None`` use torch's
            global RNG); a generator may live on any device, its noise is moved to ``logits``.

    Returns:
        ``[N] int64`` token ids on ``logits.device``. Greedy rows (``temperature == 0``) take
        the argmax, ties going to the lowest id. A row whose logits are not all finite gets
        ``NON_FINITE_TOKEN`` (the scheduler fails its request).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if len(params) != n or (generators is not None and len(generators) != n):
        raise ValueError(f"need one params (got {len(params)}) and one generator "
                         f"(got {None if generators is None else len(generators)}) per logits row ({n})")
    shared = _shared_params(params, generators)
    if shared is not None:
        tokens = _sample_shared(logits, shared)
    else:
        tokens = _sample_per_row(logits.float(), params, generators)
    # A row's sum is finite exactly when every logit is (fp32: finite logits cannot overflow it).
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))  # [N]
    return torch.where(finite, tokens, NON_FINITE_TOKEN)


def _argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)``; on the CPU through float32 (exact, the same ids, ties included):
    the CPU's half-precision argmax is three times slower than the conversion and float32 argmax."""
    if logits.device.type == "cpu" and logits.dtype != torch.float32:
        return logits.float().argmax(dim=-1)
    return logits.argmax(dim=-1)


def _shared_params(params: SequenceABC[SamplingParams],
                   generators: SequenceABC[torch.Generator | None] | None) -> SamplingParams | None:
    """The params of row 0 when every row samples alike from the global RNG, else None."""
    if not params or (generators is not None and any(gen is not None for gen in generators)):
        return None
    first = params[0]
    key = (first.temperature, first.top_k, first.top_p)
    if all(p is first or (p.temperature, p.top_k, p.top_p) == key for p in params):
        return first
    return None


def _sample_shared(logits: Tensor, params: SamplingParams) -> Tensor:
    """Every row with the same params and the global RNG, without host lists or copies: greedy
    rows take the argmax of ``logits`` as they are, temperature-only rows on CUDA the Gumbel-max
    kernel, the others :func:`_race_shared`."""
    if params.greedy:
        return _argmax(logits)  # [N]
    temperature = max(params.temperature, MIN_TEMPERATURE)
    if (logits.device.type in KERNEL_DEVICE_TYPES and logits.shape[0] >= KERNEL_MIN_ROWS
            and not _filters(params, logits.shape[1])):
        from ..kernels.sampling_triton import draw_seed, gumbel_sample  # CUDA only: Triton imported here
        return gumbel_sample(logits, temperature, draw_seed())
    return _race_shared(logits.float(), params)


def _filters(params: SamplingParams, vocab: int) -> bool:
    """Whether top-k or top-p removes tokens from a row of ``vocab``."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _race_shared(logits: Tensor, params: SamplingParams) -> Tensor:
    """The per-row path in batched form for shared random params: the same numbers for the same
    noise (the global RNG's ``exponential_``)."""
    n, vocab = logits.shape
    temp = logits.new_full((1, 1), max(params.temperature, MIN_TEMPERATURE))
    logits = logits / temp  # [N, V]
    if _filters(params, vocab):
        top_k = params.top_k if 0 < params.top_k < vocab else vocab
        k = torch.full((n, 1), top_k, dtype=torch.int64, device=logits.device)
        probs = _top_k_top_p(logits, k, logits.new_full((n, 1), params.top_p))
    else:
        probs = torch.softmax(logits, dim=-1)  # [N, V]
    return probs.div_(_global_noise(probs)).argmax(dim=-1)


def _sample_per_row(logits: Tensor, params: SequenceABC[SamplingParams],
                    generators: SequenceABC[torch.Generator | None] | None) -> Tensor:
    """Rows chosen by their params: greedy rows take the argmax, the others the exponential race."""
    out = logits.argmax(dim=-1)  # [N]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    gens = [generators[i] if generators is not None else None for i in rows]
    probs = _filtered_probs(logits[rows], [params[i] for i in rows])  # [R, V]
    noise = _exponential_noise(probs, gens)  # [R, V]
    out[rows] = probs.div_(noise).argmax(dim=-1)
    return out


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Probabilities ``[R, V]`` after temperature, top-k and top-p; filtered tokens get 0.

    Rows with and without filters take separate paths chosen per row, so a row's numbers do not
    depend on the other rows of the batch.
    """
    vocab = logits.shape[1]
    temps = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params],
                         dtype=logits.dtype, device=logits.device)
    logits = logits / temps.unsqueeze(1)  # [R, V]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    filtered = [i for i, p in enumerate(params) if top_k[i] < vocab or p.top_p < 1.0]
    if not filtered:
        return torch.softmax(logits, dim=-1)
    probs = torch.empty_like(logits)
    plain = sorted(set(range(len(params))) - set(filtered))
    if plain:
        probs[plain] = torch.softmax(logits[plain], dim=-1)
    k = torch.tensor([top_k[i] for i in filtered], device=logits.device).unsqueeze(1)  # [F, 1]
    p = torch.tensor([params[i].top_p for i in filtered], dtype=logits.dtype, device=logits.device).unsqueeze(1)
    probs[filtered] = _top_k_top_p(logits[filtered], k, p)
    return probs


def _top_k_top_p(logits: Tensor, k: Tensor, p: Tensor) -> Tensor:
    """Softmax ``[R, V]`` over the ``k [R, 1]`` best tokens, then the nucleus of mass ``p [R, 1]``."""
    r, vocab = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    rank = torch.arange(vocab, device=logits.device).expand(r, vocab)
    sorted_logits.masked_fill_(rank >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V] mass of strictly better tokens
    drop = mass_before >= p
    drop[:, 0] = False  # keep at least the best token
    sorted_probs.masked_fill_(drop, 0.0)
    return torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)


def _global_noise(probs: Tensor) -> Tensor:
    """``Exp(1)`` noise like ``probs`` from torch's global RNG, kept away from 0."""
    return torch.empty_like(probs).exponential_().clamp_(min=torch.finfo(probs.dtype).tiny)


def _exponential_noise(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """``Exp(1)`` noise ``[R, V]``; rows with a generator draw from it alone."""
    noise = torch.empty_like(probs)
    if any(gen is None for gen in generators):
        noise.exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            row_noise = torch.empty(probs.shape[1], dtype=probs.dtype, device=gen.device)
            noise[row] = row_noise.exponential_(generator=gen).to(probs.device)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
