"""RMSNormPass: every common RMSNorm spelling becomes one `infer.rms_norm`; look-alikes stay."""
import pytest
import torch
import torch.nn.functional as F

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.rms_norm import RMSNormPass

RMS = "infer.rms_norm.default"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [48, 96, 100, 128]
LEADING = [(7,), (2, 3)]  # [T, H] and [B, S, H]
HEADS = 4  # per-head norm: H = HEADS * D


def hf_llama(eps):
    def fn(x, w):
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + eps)
        return w * h.to(x.dtype)
    return fn


def functional(eps):
    return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps)


def module(eps):
    def fn(x, w):
        norm = torch.nn.RMSNorm(w.shape[0], eps=eps, device="meta")
        return torch.func.functional_call(norm, {"weight": w}, (x,))
    return fn


def no_weight(eps):
    def fn(x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return fn


def per_head(eps):
    """Qwen3 q/k norm: [..., Hq*D] viewed as [..., Hq, D], normalized over D with weight [D]."""
    def fn(x, w):
        h = x.view(*x.shape[:-1], HEADS, w.shape[0]).float()  # [..., Hq, D]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)
    return fn


def gemma(eps):
    def fn(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * (1.0 + w.float())).type_as(x)
    return fn


def t5(eps):
    """T5LayerNorm: the uncast input times the fp32 rsqrt (promoted to fp32), then cast to w's dtype."""
    def fn(x, w):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(var + eps)
        if w.dtype in (torch.float16, torch.bfloat16):
            h = h.to(w.dtype)
        return w * h
    return fn


# name -> (factory, weight length as a function of H, or None for no weight)
SPELLINGS = {
    "hf_llama": (hf_llama, lambda h: h),
    "functional": (functional, lambda h: h),
    "module": (module, lambda h: h),
    "no_weight": (no_weight, None),
    "per_head": (per_head, lambda h: h // HEADS),
    "gemma": (gemma, lambda h: h),
    "t5": (t5, lambda h: h),
}
# F.rms_norm decomposes with an in-place `add_`, which `eliminate_dead_code` keeps (the pipeline
# functionalizes first), so a dead pow/mean/add_ chain survives in these graphs.
KEEPS_DEAD_INPLACE = {"functional", "module"}


def inputs(spelling, dtype, leading, hidden):
    x = torch.randn(*leading, hidden, dtype=dtype)  # [..., H]
    weight_len = SPELLINGS[spelling][1]
    if weight_len is None:
        return (x,)
    return x, 1.0 + 0.5 * torch.randn(weight_len(hidden), dtype=dtype)


def traced_clean(fn, *args):
    """The traced graph with decomposition leftovers (dead nodes) already removed."""
    gm = aten_graph(fn, *args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def only_node(gm, target: str):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == target]
    assert len(nodes) == 1, f"expected one {target}, found {len(nodes)}:\n{gm.graph}"
    return nodes[0]


def placeholder(gm, index):
    return [n for n in gm.graph.nodes if n.op == "placeholder"][index]


@pytest.mark.parametrize("leading", LEADING, ids=["TH", "BSH"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spelling_fused_to_one_op(spelling, dtype, hidden, leading):
    fn = SPELLINGS[spelling][0](1e-6)
    args = inputs(spelling, dtype, leading, hidden)
    gm = aten_graph(fn, *args)
    before = op_counts(gm)
    assert before["aten.rsqrt.default"] == 1 and before[RMS] == 0

    rewrites, _ = run_pass(RMSNormPass, gm)

    after = op_counts(gm)
    assert rewrites == 1
    assert after[RMS] == 1
    assert after["aten.rsqrt.default"] == 0
    assert after["aten.mul.Tensor"] == 0  # normalization and weight multiply both absorbed
    if spelling not in KEEPS_DEAD_INPLACE:
        assert after["aten.mean.dim"] == 0 and after["aten.pow.Tensor_Scalar"] == 0
    node = only_node(gm, RMS)
    x_arg, weight, _, cast_before_weight, out_dtype = node.args
    assert out_dtype == dtype
    if spelling == "per_head":
        assert str(x_arg.target) == "aten.view.default" and x_arg.args[0] is placeholder(gm, 0)
    else:
        assert x_arg is placeholder(gm, 0)
    if spelling == "no_weight":
        assert weight is None
    elif spelling == "gemma":  # the weight operand is the computed `1 + w`, applied in fp32
        assert str(weight.target) == "aten.add.Tensor" and 1.0 in weight.args
        assert cast_before_weight is False
    else:
        assert weight is placeholder(gm, 1)
    if spelling in ("hf_llama", "per_head"):  # `w * h.to(x.dtype)` rounds before the weight
        assert cast_before_weight is (dtype != torch.float32)
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[dtype])


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.25])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_eps_is_carried(spelling, eps):
    fn = SPELLINGS[spelling][0](eps)
    args = inputs(spelling, torch.float32, (5,), 96)
    args = (0.05 * args[0],) + args[1:]  # small inputs: the output depends on eps visibly
    gm = aten_graph(fn, *args)
    rewrites, _ = run_pass(RMSNormPass, gm)
    assert rewrites == 1
    assert only_node(gm, RMS).args[2] == pytest.approx(eps, rel=1e-6)
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.float32])


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("spelling", ["hf_llama", "gemma"])
def test_weight_dtype_differs_from_input(spelling, x_dtype, w_dtype):
    """fp32 weights on bf16 activations and the like: the output dtype is eager's promoted one."""
    fn = SPELLINGS[spelling][0](1e-6)
    args = torch.randn(2, 3, 100, dtype=x_dtype), torch.randn(100, dtype=w_dtype)
    gm = aten_graph(fn, *args)
    rewrites, _ = run_pass(RMSNormPass, gm)
    assert rewrites == 1 and op_counts(gm)["aten.rsqrt.default"] == 0
    got, want = gm(*args), fn(*args)
    assert only_node(gm, RMS).args[4] == want.dtype == got.dtype
    torch.testing.assert_close(got, want, **TOL[want.dtype])


def test_plain_fp32_norm_without_casts():
    def fn(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    args = torch.randn(3, 4, 100), torch.randn(100)
    gm = aten_graph(fn, *args)
    assert op_counts(gm)["prims.convert_element_type.default"] == 0
    rewrites, _ = run_pass(RMSNormPass, gm)
    assert rewrites == 1 and op_counts(gm) == {RMS: 1}
    assert only_node(gm, RMS).args[1:] == (placeholder(gm, 1), 1e-5, False, torch.float32)
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.float32])


def _eager_norm(h, eps=1e-6):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def layer_norm(x, w):
    return F.layer_norm(x, (x.shape[-1],), w, None, 1e-5)


def mean_over_first_dim(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6)).to(x.dtype)


def rsqrt_also_returned(x, w):
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * (h * r).to(x.dtype), r


def variance_also_returned(x, w):
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(var + 1e-6)).to(x.dtype), var


def normalized_also_returned(x, w):
    n = _eager_norm(x.float())
    return w * n.to(x.dtype), n


def keepdim_false(x, w):
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1) + 1e-6)
    return w * (h * r.unsqueeze(-1)).to(x.dtype)


def rsqrt_scales_another_tensor(x, w):  # the rsqrt of x's norm applied to 2 * x
    r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * ((2 * x.float()) * r).to(x.dtype)


def no_upcast(x, w):  # norm computed in the input dtype: the op would change the rounding
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


# name -> (fn, near-miss reason the pass must record, or None where it may stay silent)
NOT_MATCHING = {
    "layer_norm": (layer_norm, None),
    "mean_over_first_dim": (mean_over_first_dim, "mean is not over the last dim"),
    "rsqrt_also_returned": (rsqrt_also_returned, "rsqrt is used outside the norm"),
    "variance_also_returned": (variance_also_returned, None),
    "normalized_also_returned": (normalized_also_returned, "normalized value used outside"),
    "keepdim_false": (keepdim_false, "keepdim=True"),
    "no_upcast": (no_upcast, "norm computed in torch.bfloat16"),
    "rsqrt_scales_another_tensor": (rsqrt_scales_another_tensor, "rsqrt multiplies a value other than the norm's input"),
}


@pytest.mark.parametrize("leading", LEADING, ids=["TH", "BSH"])
@pytest.mark.parametrize("case", list(NOT_MATCHING))
def test_not_matched(case, leading):
    fn, reason = NOT_MATCHING[case]
    dtype = torch.bfloat16
    args = torch.randn(*leading, 100, dtype=dtype), torch.randn(100, dtype=dtype)
    gm = traced_clean(fn, *args)
    before, code = op_counts(gm), gm.code

    rewrites, context = run_pass(RMSNormPass, gm)

    assert rewrites == 0
    assert op_counts(gm) == before and gm.code == code
    if reason is not None:
        assert any(reason in m for m in context.near_misses), context.near_misses
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_broadcasting_over_another_dim_is_not_absorbed(dtype):
    """The norm itself is fused, but a [T, 1] scale stays an ordinary multiply after it."""
    def fn(x, scale):
        h = x.float()
        return scale * _eager_norm(h).to(x.dtype)

    args = torch.randn(7, 96, dtype=dtype), torch.randn(7, 1, dtype=dtype)
    gm = aten_graph(fn, *args)
    rewrites, _ = run_pass(RMSNormPass, gm)
    assert rewrites == 1
    assert op_counts(gm)["aten.mul.Tensor"] == 1
    assert only_node(gm, RMS).args[1] is None
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[dtype])


def test_two_norms_fused_independently():
    def fn(x, w1, w2):
        y = hf_llama(1e-5)(x, w1)
        return hf_llama(1e-6)(y * 2, w2)

    args = torch.randn(6, 48, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16), \
        torch.randn(48, dtype=torch.bfloat16)
    gm = aten_graph(fn, *args)
    rewrites, _ = run_pass(RMSNormPass, gm)
    assert rewrites == 2 and op_counts(gm)[RMS] == 2
    eps = [n.args[2] for n in gm.graph.nodes if str(n.target) == RMS]
    assert eps == [1e-5, 1e-6]
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.bfloat16])


def test_norm_over_a_transposed_view_is_left_alone():
    """Gemma 3 / EXAONE 4 q/k norms run after ``transpose(1, 2)``. Eager keeps that layout, and the
    model later views the result as such, which a contiguous op output would break."""
    batch, seq, dim = 2, 3, 16

    def fn(x, w):  # x [B, S, Hq*D]
        q = x.view(batch, seq, HEADS, dim).transpose(1, 2)  # [B, Hq, S, D], strided
        h = q.float()
        n = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return n.transpose(1, 2).view(batch, seq, HEADS * dim)  # a view only for n's own layout

    args = torch.randn(batch, seq, HEADS * dim, dtype=torch.bfloat16), torch.randn(dim, dtype=torch.bfloat16)
    gm = traced_clean(fn, *args)

    rewrites, context = run_pass(RMSNormPass, gm)

    assert rewrites == 0
    assert any("not contiguous" in m for m in context.near_misses), context.near_misses
    torch.testing.assert_close(gm(*args), fn(*args), rtol=0, atol=0)


def test_norm_over_a_contiguous_transpose_is_fused():
    """The same norm over a tensor made contiguous after the transpose is fused as before."""
    def fn(x, w):  # x [B, S, Hq*D]
        q = x.view(2, 3, HEADS, 16).transpose(1, 2).contiguous()  # [B, Hq, S, D]
        h = q.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    args = torch.randn(2, 3, HEADS * 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    gm = traced_clean(fn, *args)

    rewrites, _ = run_pass(RMSNormPass, gm)

    assert rewrites == 1 and op_counts(gm)[RMS] == 1
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.bfloat16])


def test_hf_t5_layer_norm_in_bf16_is_fused_and_matches_eager():
    """transformers' T5LayerNorm (bf16 input times fp32 rsqrt) under backend='infer'."""
    import infer.compiler as ic
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    norm = T5LayerNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(64))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = norm(x)
        got = torch.compile(norm, backend="infer", options={"inner_compiler": "eager"})(x)
    assert ic.last_report().fusions == {"rms_norm": 1}, ic.last_report().near_misses
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
