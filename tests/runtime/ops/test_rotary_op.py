"""``infer::rotary_embedding`` and ``infer::qk_norm_rotary``: the Triton kernel (CPU tensors under
``TRITON_INTERPRET=1``, else CUDA) and the ops against the model's ``apply_rotary`` and HF.

The rotation is bit-exact everywhere. The fused norm sums squares in another order than torch
and the ``rms_norm`` kernel, so on random inputs it may differ by an fp32 ulp (seldom a bf16/fp16
bit); with inputs whose norm is exact (``|x|`` a power of two per head, ``eps = 0``) it is
bit-exact too.
"""
import os

import pytest
import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from conftest import DEVICES
import infer.runtime.ops  # noqa: F401  (registers torch.ops.infer.*)
from infer.models.layers.rotary import apply_rotary, get_rope

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, Hq, Hk, D, R): full and partial rotary, GQA and MHA, D not a power of two, T = 1, T = 0
SHAPES = [(1, 4, 2, 16, 16), (3, 4, 2, 16, 8), (2, 3, 1, 12, 6), (4, 2, 2, 8, 8), (0, 2, 1, 8, 8)]
EXACT = dict(atol=0, rtol=0)
infer = torch.ops.infer


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from infer.runtime.kernels import rotary_triton
    return rotary_triton


def qk_cos_sin(shape, dtype, device="cpu", seed=0, exact_norm=False):
    """q, k as head views of one packed projection output, cos/sin as halves of one cache row."""
    t, hq, hk, d, r = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)  # [T, (Hq+2Hk)*D]
    if exact_norm:  # |x| = 2^e for a whole head: mean(x^2) = 4^e, rsqrt exact
        signs = torch.randint(0, 2, qkv.shape, generator=g) * 2 - 1
        exps = torch.randint(-3, 4, (t, hq + 2 * hk, 1), generator=g).float()
        qkv = (signs.view(t, -1, d) * torch.exp2(exps)).view(t, -1)
    qkv = qkv.to(dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(t, hq, d)  # [T, Hq, D], token stride (Hq+2Hk)*D
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)  # [T, Hk, D]
    cos, sin = torch.randn(t, r, generator=g).to(device).chunk(2, dim=-1)  # [T, R/2] each, row stride R
    return q, k, cos, sin


def norm_args(d, dtype, has_weight, cast_before_weight, weight_dtype=None, eps=1e-6, seed=1, device="cpu"):
    """``(weight, eps, cast_before_weight, out_dtype)`` as ``infer::rms_norm`` takes them after x."""
    g = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    weight = (1 + 0.5 * torch.randn(d, generator=g)).to(weight_dtype).to(device) if has_weight else None
    out_dtype = torch.promote_types(dtype, weight_dtype) if has_weight else dtype
    return weight, eps, cast_before_weight, out_dtype


def few_flips(actual, expected):
    """Equal up to summation order: within a few ulps, and most elements bit-identical."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    flipped = (actual != expected).sum().item()
    if expected.dtype != torch.float32:
        assert flipped <= max(1, expected.numel() // 20), f"{flipped}/{expected.numel()} differ"


# ---------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_rotary_is_bit_exact(kernel, shape, dtype):
    q, k, cos, sin = qk_cos_sin(shape, dtype, KERNEL_DEVICE)
    q_out, k_out = kernel.qk_rotary_triton(q, k, cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == k_out.dtype == dtype
    torch.testing.assert_close(q_out, apply_rotary(q, cos, sin), **EXACT)
    torch.testing.assert_close(k_out, apply_rotary(k, cos, sin), **EXACT)


def fused_and_chain(kernel, q, k, cos, sin, q_norm, k_norm):
    fused = kernel.qk_rotary_triton(q, k, cos, sin, kernel.NormArgs(*q_norm), kernel.NormArgs(*k_norm))
    chain = infer.rotary_embedding(infer.rms_norm(q, *q_norm), infer.rms_norm(k, *k_norm), cos, sin)
    return fused, chain


# (has_weight, cast_before_weight, weight dtype: None = q's)
NORM_MODES = [(True, True, None), (True, False, None), (False, False, None), (True, False, torch.float32)]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # padding heads with eps = 0 (never stored)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("mode", NORM_MODES, ids=["cast_first", "weight_first", "no_weight", "fp32_weight"])
def test_kernel_norm_rotary_with_exact_norm_is_bit_exact(kernel, shape, dtype, mode):
    q, k, cos, sin = qk_cos_sin(shape, dtype, KERNEL_DEVICE, exact_norm=True)
    has_weight, cast, weight_dtype = mode
    q_norm = norm_args(shape[3], dtype, has_weight, cast, weight_dtype, eps=0.0, device=q.device)
    k_cast = has_weight and not cast  # k: its own weight and rounding
    k_norm = norm_args(shape[3], dtype, has_weight, k_cast, weight_dtype, eps=0.0, seed=2, device=q.device)
    (q_out, k_out), (q_ref, k_ref) = fused_and_chain(kernel, q, k, cos, sin, q_norm, k_norm)
    assert q_out.dtype == q_norm[3] and k_out.dtype == k_norm[3]
    torch.testing.assert_close(q_out, q_ref, **EXACT)
    torch.testing.assert_close(k_out, k_ref, **EXACT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_norm_rotary_matches_chain(kernel, shape, dtype):
    q, k, cos, sin = qk_cos_sin(shape, dtype, KERNEL_DEVICE, seed=3)
    q_norm = norm_args(shape[3], dtype, True, True, device=q.device)
    k_norm = norm_args(shape[3], dtype, True, True, eps=1e-5, seed=4, device=q.device)
    (q_out, k_out), (q_ref, k_ref) = fused_and_chain(kernel, q, k, cos, sin, q_norm, k_norm)
    few_flips(q_out, q_ref)
    few_flips(k_out, k_ref)


# ---------------------------------------------------------------- the ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotary_op_is_apply_rotary(shape, dtype, device):
    q, k, cos, sin = qk_cos_sin(shape, dtype, device)
    q_out, k_out = infer.rotary_embedding(q, k, cos, sin)
    torch.testing.assert_close(q_out, apply_rotary(q, cos, sin), **EXACT)
    torch.testing.assert_close(k_out, apply_rotary(k, cos, sin), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_match_hf_qwen3_attention_prologue(dtype):
    """HF Qwen3: q_norm/k_norm per head, then apply_rotary_pos_emb; our cos/sin from get_rope."""
    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=64, rms_norm_eps=1e-6)
    positions = torch.tensor([0, 1, 5, 33, 63])
    hf_cos, hf_sin = Qwen3RotaryEmbedding(config)(torch.zeros(1), positions[None])  # [1, T, D]
    q, k, _, _ = qk_cos_sin((5, 4, 2, 32, 32), dtype)
    q_norm, k_norm = Qwen3RMSNorm(32, 1e-6).to(dtype), Qwen3RMSNorm(32, 1e-6).to(dtype)
    with torch.no_grad():
        q_norm.weight.normal_(1, 0.3)
        k_norm.weight.normal_(1, 0.3)
        hf_q, hf_k = apply_rotary_pos_emb(q_norm(q), k_norm(k), hf_cos[0].to(dtype), hf_sin[0].to(dtype),
                                          unsqueeze_dim=1)
    cos, sin = get_rope(config, 32)(positions)
    torch.testing.assert_close(infer.rotary_embedding(q_norm(q), k_norm(k), cos, sin), (hf_q, hf_k), **EXACT)
    fused = infer.qk_norm_rotary(q, q_norm.weight, 1e-6, True, dtype, k, k_norm.weight, 1e-6, True, dtype, cos, sin)
    torch.testing.assert_close(fused, (hf_q, hf_k), **EXACT)


def test_qk_norm_rotary_op_on_cpu_is_the_chain():
    q, k, cos, sin = qk_cos_sin((3, 4, 2, 16, 8), torch.bfloat16)
    q_norm, k_norm = norm_args(16, torch.bfloat16, True, True), norm_args(16, torch.bfloat16, True, False, seed=5)
    got = infer.qk_norm_rotary(q, *q_norm, k, *k_norm, cos, sin)
    want = (apply_rotary(infer.rms_norm(q, *q_norm), cos, sin), apply_rotary(infer.rms_norm(k, *k_norm), cos, sin))
    torch.testing.assert_close(got, want, **EXACT)


def test_opcheck():
    q, k, cos, sin = qk_cos_sin((3, 4, 2, 16, 8), torch.bfloat16)
    torch.library.opcheck(infer.rotary_embedding.default, (q, k, cos, sin))
    q_norm, k_norm = norm_args(16, torch.bfloat16, True, True), norm_args(16, torch.bfloat16, False, False)
    torch.library.opcheck(infer.qk_norm_rotary.default, (q, *q_norm, k, *k_norm, cos, sin))


def test_compiles_fullgraph_with_dynamic_tokens():
    def fn(q, k, cos, sin, w):
        q, k = infer.rotary_embedding(q, k, cos, sin)
        return infer.qk_norm_rotary(q, w, 1e-6, True, q.dtype, k, w, 1e-5, True, k.dtype, cos, sin)

    q, k, cos, sin = qk_cos_sin((5, 4, 2, 16, 16), torch.float32)
    w = torch.randn(16)
    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, cos, sin, w), fn(q, k, cos, sin, w), **EXACT)


def test_bad_input_is_named():
    q, k, cos, sin = qk_cos_sin((3, 4, 2, 16, 8), torch.float32)
    cases = [
        ((q.flatten(1), k, cos, sin), r"q as \[T, Hq, D\], got shape \(3, 64\)"),
        ((q, k[..., :8], cos, sin), r"k as \[T=3, Hk, D=16\]"),
        ((q, k[:2], cos, sin), r"k as \[T=3, Hk, D=16\]"),
        ((q, k, torch.randn(3, 9), sin), r"cos as \[T=3, R/2\] with 0 < R <= D=16, got shape \(3, 9\)"),
        ((q, k, cos, sin[:, :2]), r"sin of cos's shape \(3, 4\)"),
        ((q, k.int(), cos, sin), "floating-point k, got torch.int32"),
        ((q, k, cos.to("meta"), sin), "cos is on meta but q is on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            infer.rotary_embedding(*args)
    with pytest.raises(ValueError, match=r"norm of k: rms_norm weight must have shape \[16\]"):
        infer.qk_norm_rotary(q, None, 1e-6, False, torch.float32, k, torch.ones(8), 1e-6, False, torch.float32,
                             cos, sin)
    with pytest.raises(ValueError, match="qk_norm_rotary needs cos"):
        infer.qk_norm_rotary(q, None, 1e-6, False, torch.float32, k, None, 1e-6, False, torch.float32,
                             cos[:1], sin[:1])


# ---------------------------------------------------------------- on a GPU: real sizes, bit for bit
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("heads", [(16, 8, 128, 128), (32, 8, 128, 128), (32, 8, 128, 64), (14, 2, 64, 64)],
                         ids=["qwen3-0.6b", "qwen3-8b", "partial", "smollm2"])
def test_cuda_kernels_bit_for_bit(heads, tokens, dtype):
    """The CUDA op against eager ``apply_rotary`` on CUDA and on CPU (bit-exact), and the fused op
    against the CUDA chain ``rotary_embedding(rms_norm(q), rms_norm(k))``."""
    hq, hk, d, r = heads
    shape = (tokens, hq, hk, d, r)
    q, k, cos, sin = qk_cos_sin(shape, dtype, "cuda")
    q_out, k_out = infer.rotary_embedding(q, k, cos, sin)
    for got, x in ((q_out, q), (k_out, k)):
        torch.testing.assert_close(got, apply_rotary(x, cos, sin), **EXACT)
        torch.testing.assert_close(got.cpu(), apply_rotary(x.cpu(), cos.cpu(), sin.cpu()), **EXACT)
    for exact_norm in (True, False):
        q, k, cos, sin = qk_cos_sin(shape, dtype, "cuda", seed=7, exact_norm=exact_norm)
        eps = 0.0 if exact_norm else 1e-6
        q_norm, k_norm = (norm_args(d, dtype, True, True, eps=eps, seed=s, device="cuda") for s in (8, 9))
        got = infer.qk_norm_rotary(q, *q_norm, k, *k_norm, cos, sin)
        chain = infer.rotary_embedding(infer.rms_norm(q, *q_norm), infer.rms_norm(k, *k_norm), cos, sin)
        for g, c in zip(got, chain):
            if exact_norm:
                torch.testing.assert_close(g, c, **EXACT)
            else:
                few_flips(g, c)
