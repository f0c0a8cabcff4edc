"""``infer::rope_paged_attention`` equals the rotary (or qk_norm_rotary) + ``paged_attention`` chain on
every backend, and a uniform decode step on the Triton backend takes the one-kernel path."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from infer.runtime import ops  # noqa: E402,F401
from infer.runtime.attention import forward_context, rope_op  # noqa: E402,F401
from tests.runtime.test_paged_attention import make_batch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
infer = torch.ops.infer


def args_for(batch, qk_norm: bool, half: int = 32, seed: int = 0):
    """The op's arguments after ``(q, k, v, kv_cache, scale)``: cos/sin views of one table, norms."""
    gen = torch.Generator().manual_seed(seed)
    d, dtype = batch.q.shape[2], batch.q.dtype
    cos_sin = torch.randn(batch.q.shape[0], 2 * half, generator=gen).to(batch.q.device)
    w = [(1 + 0.1 * torch.randn(d, generator=gen)).to(batch.q.device, dtype) for _ in range(2)]
    return (cos_sin[:, :half], cos_sin[:, half:], qk_norm, w[0], 1e-6, True, dtype, w[1], 1e-5, True, dtype)


def chain(batch, cache, rest, scale):
    cos, sin, qk_norm, qw, q_eps, q_cast, q_dt, kw, k_eps, k_cast, k_dt = rest
    if qk_norm:
        q, k = infer.qk_norm_rotary(batch.q, qw, q_eps, q_cast, q_dt, batch.k, kw, k_eps, k_cast, k_dt, cos, sin)
    else:
        q, k = infer.rotary_embedding(batch.q, batch.k, cos, sin)
    return infer.paged_attention(q.flatten(1), k.flatten(1), batch.v.flatten(1), cache, scale)


def run_both(batch, qk_norm, scale=0.125):
    rest = args_for(batch, qk_norm)
    fused_cache, chain_cache = batch.cache.clone(), batch.cache.clone()
    with forward_context(batch.md):
        fused = infer.rope_paged_attention(batch.q, batch.k, batch.v.flatten(1), fused_cache, scale, *rest)
        expected = chain(batch, chain_cache, rest, scale)
    return fused, fused_cache, expected, chain_cache


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_reference_backend_is_the_chain(step, qk_norm, monkeypatch):
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "reference")
    lens = ([4, 3], [9, 3]) if step == "prefill" else ([1, 1, 1], [9, 17, 1])
    batch = make_batch(*lens, 4, 2, 64, 16, seed=2)
    fused, fused_cache, expected, chain_cache = run_both(batch, qk_norm)
    assert fused.shape == (batch.q.shape[0], 4 * 64)
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)
    torch.testing.assert_close(fused_cache, chain_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_triton_decode_runs_one_kernel_and_equals_the_chain(qk_norm, monkeypatch):
    from infer.runtime.kernels import attention_triton as kernels
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "triton")
    calls = []
    real = kernels.decode_attention_with_kv_write
    monkeypatch.setattr(kernels, "decode_attention_with_kv_write",
                        lambda *a, **kw: calls.append(kw.get("rope")) or real(*a, **kw))
    batch = make_batch([1] * 3, [33, 9, 16], 4, 2, 64, 16, dtype=torch.float16, device=DEVICE, seed=1)
    fused, fused_cache, expected, chain_cache = run_both(batch, qk_norm)
    assert calls[0] is not None and (calls[0].q_norm is not None) == qk_norm  # the in-kernel rotary ran
    ulp = 2**-10
    torch.testing.assert_close(fused_cache, chain_cache, rtol=ulp, atol=ulp, equal_nan=True)
    torch.testing.assert_close(fused, expected, rtol=4 * ulp, atol=4 * ulp)


def test_triton_fp32_and_prefill_take_the_chain(monkeypatch):
    """What the one kernel cannot compute exactly (fp32 rotary, prefill) runs the chain: same numbers."""
    from infer.runtime.kernels import attention_triton as kernels
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "triton")
    calls = []
    real = kernels.decode_attention_with_kv_write
    monkeypatch.setattr(kernels, "decode_attention_with_kv_write",
                        lambda *a, **kw: calls.append(kw.get("rope")) or real(*a, **kw))
    for lens, dtype in ((([1, 1], [5, 20]), torch.float32), (([4, 3], [9, 3]), torch.float16)):
        batch = make_batch(*lens, 4, 2, 64, 16, dtype=dtype, device=DEVICE, seed=3)
        fused, fused_cache, expected, chain_cache = run_both(batch, True)
        torch.testing.assert_close(fused, expected, rtol=0, atol=0)
        torch.testing.assert_close(fused_cache, chain_cache, rtol=0, atol=0, equal_nan=True)
    assert all(rope is None for rope in calls)


def test_opcheck_and_bad_input(monkeypatch):
    monkeypatch.setenv("INFER_ATTENTION_BACKEND", "reference")
    batch = make_batch([1, 1], [5, 20], 4, 2, 64, 16)
    cache = batch.cache.nan_to_num(0.0)  # opcheck compares caches across runs
    rest = args_for(batch, True)
    with forward_context(batch.md):
        torch.library.opcheck(infer.rope_paged_attention.default, (batch.q, batch.k, batch.v.flatten(1), cache,
                                                                   0.125, *rest))
        with pytest.raises(ValueError, match=r"q \[T, Hq, D\]"):
            infer.rope_paged_attention(batch.q.flatten(1), batch.k, batch.v, cache, 0.125, *rest)
        with pytest.raises(ValueError, match=r"cos/sin \[T, R/2\]"):
            infer.rope_paged_attention(batch.q, batch.k, batch.v, cache, 0.125, rest[0].flatten(), *rest[1:])
