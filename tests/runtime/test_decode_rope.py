"""Decode attention with the q/k norms and rotary in its prologue vs ``infer::qk_norm_rotary`` (or
``infer::rotary_embedding``) followed by the fused-write decode kernel."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from infer.runtime import ops  # noqa: E402,F401  (registers torch.ops.infer.*)
from tests.runtime.test_paged_attention import make_batch  # noqa: E402

triton = pytest.importorskip("triton")
from infer.runtime.kernels import attention_triton as kernels  # noqa: E402
from infer.runtime.kernels.rotary_triton import NormArgs, RopeArgs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = kernels.DecodeConfig(block_n=16)
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}  # a norm's fp32 sum order may move one rounding


def rope_inputs(batch, half: int, norm: str, dtype, seed: int = 0):
    """cos/sin views of one ``[B, 2*half]`` fp32 table (as the model slices it) and the norms."""
    gen = torch.Generator().manual_seed(seed)
    d = batch.q.shape[2]
    cos_sin = torch.randn(batch.q.shape[0], 2 * half, generator=gen).to(DEVICE)
    cos, sin = cos_sin[:, :half], cos_sin[:, half:]
    if norm == "none":
        return RopeArgs(cos, sin)
    weights = [None, None] if norm == "no_weight" else \
        [(1 + 0.1 * torch.randn(d, generator=gen)).to(DEVICE, dtype) for _ in range(2)]
    return RopeArgs(cos, sin, NormArgs(weights[0], 1e-6, True, dtype), NormArgs(weights[1], 1e-5, True, dtype))


def unfused(batch, rope: RopeArgs, cache, scale, num_splits):
    """The op chain the fused kernel replaces: rotary (after the norms), then the fused-write kernel."""
    infer = torch.ops.infer
    if rope.q_norm is None:
        q, k = infer.rotary_embedding(batch.q, batch.k, rope.cos, rope.sin)
    else:
        qn, kn = rope.q_norm, rope.k_norm
        q, k = infer.qk_norm_rotary(batch.q, qn.weight, qn.eps, qn.cast_before_weight, qn.out_dtype,
                                    batch.k, kn.weight, kn.eps, kn.cast_before_weight, kn.out_dtype, rope.cos, rope.sin)
    md = batch.md
    return kernels.decode_attention_with_kv_write(q, k, batch.v, cache, md.slot_mapping, md.seq_lens,
                                                  md.block_tables, scale, config=CONFIG, num_splits=num_splits)


def check(batch, rope, num_splits, scale=0.125):
    md = batch.md
    fused_cache, chain_cache = batch.cache.clone(), batch.cache.clone()
    fused = kernels.decode_attention_with_kv_write(batch.q, batch.k, batch.v, fused_cache, md.slot_mapping,
                                                   md.seq_lens, md.block_tables, scale, config=CONFIG,
                                                   num_splits=num_splits, rope=rope)
    chain = unfused(batch, rope, chain_cache, scale, num_splits)
    ulp = ULP[batch.q.dtype]
    torch.testing.assert_close(fused_cache, chain_cache, equal_nan=True, rtol=ulp, atol=ulp)
    torch.testing.assert_close(fused, chain, rtol=4 * ulp, atol=4 * ulp)
    return fused_cache, chain_cache


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("norm", ["weights", "no_weight", "none"])
def test_rope_in_kernel_matches_the_op_chain(norm, num_splits):
    batch = make_batch([1] * 3, [33, 9, 16], 4, 2, 64, 16, dtype=torch.float16, device=DEVICE, seed=1)
    fused_cache, chain_cache = check(batch, rope_inputs(batch, 32, norm, torch.float16), num_splits)
    written = ~torch.isnan(chain_cache) & torch.isnan(batch.cache.to(DEVICE))  # the rows this step stored
    assert written.sum() == 2 * 3 * 2 * 64  # k and v, 3 sequences, 2 kv heads: the new rows really changed
    assert not torch.equal(fused_cache[0][written[0]], batch.k.flatten())  # k was rotated before the store


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_rope_gqa_partial_rotary_and_dtypes(group, dtype):
    """Rotary over the first 48 of 64 dims (the tail passes through), every GQA group size."""
    batch = make_batch([1] * 2, [20, 5], 2 * group, 2, 64, 16, dtype=dtype, device=DEVICE, seed=group)
    check(batch, rope_inputs(batch, 24, "weights", dtype, seed=group), num_splits=2)


def test_rope_rejects_what_it_cannot_fuse():
    batch = make_batch([1], [5], 2, 1, 64, 16, dtype=torch.float16, device=DEVICE)
    md = batch.md
    run = lambda rope: kernels.decode_attention_with_kv_write(  # noqa: E731
        batch.q, batch.k, batch.v, batch.cache.clone(), md.slot_mapping, md.seq_lens, md.block_tables, 0.1,
        config=CONFIG, rope=rope)
    good = rope_inputs(batch, 32, "weights", torch.float16)
    with pytest.raises(ValueError, match="cos/sin"):
        run(RopeArgs(good.cos[:, :0], good.sin[:, :0], good.q_norm, good.k_norm))
    with pytest.raises(ValueError, match="cos/sin"):
        run(RopeArgs(torch.zeros(1, 40, device=DEVICE), torch.zeros(1, 40, device=DEVICE)))  # R = 80 > D
    with pytest.raises(ValueError, match="both norms"):
        run(RopeArgs(good.cos, good.sin, good.q_norm, None))
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(1, 64, device=DEVICE)[:, ::2]  # [1, 32], stride 2 along R/2
        run(RopeArgs(strided, strided))
