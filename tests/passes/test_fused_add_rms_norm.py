"""FusedAddRMSNormPass: a residual add feeding `infer.rms_norm` becomes `infer.fused_add_rms_norm`."""
import pytest
import torch

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.fused_add_rms_norm import FusedAddRMSNormPass
from infer.passes.rms_norm import RMSNormPass

RMS = "infer.rms_norm.default"
FUSED = "infer.fused_add_rms_norm.default"
ADD = "aten.add.Tensor"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [48, 96, 100, 128]
LEADING = [(7,), (2, 3)]  # [T, H] and [B, S, H]


def norm(s, w, eps=1e-6):
    """Hugging Face Llama RMSNorm."""
    h = s.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(s.dtype)


def sum_used_after(a, b, w):
    s = a + b
    return norm(s, w), s * 2


def final_norm(a, b, w):
    return norm(a + b, w)


def sum_used_before(a, b, w):  # weight is an input, so the fused op can sit right after the add
    s = a + b
    early = s * 3
    return norm(s, w), early


def two_layers(a, b, w):
    s1 = a + b
    y1 = norm(s1, w, 1e-5)
    s2 = s1 + 0.5 * y1
    return norm(s2, w, 1e-6), s2


def no_weight_norm(a, b, w):
    s = a + b
    h = s.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(s.dtype), s - w


def gemma_weight_after_add(a, b, w):  # the `1 + w` weight is computed after the add
    s = a + b
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * (1.0 + w.float())).type_as(s), s * 2


# name -> (fn, fused ops expected)
MATCHING = {
    "gemma_weight_after_add": (gemma_weight_after_add, 1),
    "sum_used_after": (sum_used_after, 1),
    "final_norm": (final_norm, 1),
    "sum_used_before": (sum_used_before, 1),
    "two_layers": (two_layers, 2),
    "no_weight_norm": (no_weight_norm, 1),
}


def normed_graph(fn, *args):
    """`fn` traced, with RMSNormPass already run (and at least one norm fused)."""
    gm = aten_graph(fn, *args)
    norms, _ = run_pass(RMSNormPass, gm)
    assert op_counts(gm)[RMS] == norms > 0
    return gm


def inputs(dtype, leading, hidden):
    a = torch.randn(*leading, hidden, dtype=dtype)  # [..., H]
    b = torch.randn(*leading, hidden, dtype=dtype)  # [..., H]
    return a, b, 1.0 + 0.5 * torch.randn(hidden, dtype=dtype)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("leading", LEADING, ids=["TH", "BSH"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MATCHING))
def test_add_fused_into_norm(case, dtype, hidden, leading):
    fn, expected = MATCHING[case]
    args = inputs(dtype, leading, hidden)
    gm = normed_graph(fn, *args)
    adds_before = op_counts(gm)[ADD]

    rewrites, _ = run_pass(FusedAddRMSNormPass, gm)

    after = op_counts(gm)
    assert rewrites == expected
    assert after[FUSED] == expected and after[RMS] == 0
    assert after[ADD] == adds_before - expected
    fused = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    for node in fused:
        assert len(node.args) == 6 and node.args[5] == dtype
    if case != "two_layers":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert list(fused[0].args[:2]) == placeholders[:2]
    if case == "no_weight_norm":
        assert fused[0].args[2] is None
    got, want = as_tuple(gm(*args)), as_tuple(fn(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_eps_and_weight_carried_over():
    args = inputs(torch.bfloat16, (4,), 100)
    gm = normed_graph(two_layers, *args)
    run_pass(FusedAddRMSNormPass, gm)
    fused = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    weight = [n for n in gm.graph.nodes if n.op == "placeholder"][2]
    assert [n.args[2:6] for n in fused] == [(weight, 1e-5, True, torch.bfloat16),
                                           (weight, 1e-6, True, torch.bfloat16)]


def test_fp32_residual_with_bf16_hidden():
    """Residual kept in fp32 (mixed add): the sum and the norm run in the promoted dtype."""
    def fn(h, residual, w):
        s = h + residual
        return norm(s, w), s

    bf16 = torch.bfloat16
    args = torch.randn(5, 96, dtype=bf16), torch.randn(5, 96), torch.randn(96, dtype=bf16)
    gm = normed_graph(fn, *args)
    rewrites, _ = run_pass(FusedAddRMSNormPass, gm)
    assert rewrites == 1
    got, want = gm(*args), fn(*args)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def broadcast_add(a, b, w):
    return norm(a + w, w), b  # w [H] broadcasts over the rows of a


def scalar_add(a, b, w):
    return norm(a + 1.0, w), b


def add_with_alpha(a, b, w):
    return norm(torch.add(a, b, alpha=2), w)


def sum_before_weight_after(a, b, w):  # sum used before the norm, weight computed after the add
    s = a + b
    early = s * 3
    return norm(s, w * 2), early


# name -> (fn, near-miss reason the pass must record, or None where it may stay silent)
NOT_MATCHING = {
    "broadcast_add": (broadcast_add, "broadcasts"),
    "scalar_add": (scalar_add, "scalar operand"),
    "add_with_alpha": (add_with_alpha, None),
    "sum_before_weight_after": (sum_before_weight_after, "sum used before the norm"),
}


@pytest.mark.parametrize("leading", LEADING, ids=["TH", "BSH"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(NOT_MATCHING))
def test_not_matched(case, dtype, leading):
    fn, reason = NOT_MATCHING[case]
    args = inputs(dtype, leading, 100)
    gm = normed_graph(fn, *args)
    before, code = op_counts(gm), gm.code

    rewrites, context = run_pass(FusedAddRMSNormPass, gm)

    assert rewrites == 0
    assert op_counts(gm) == before and gm.code == code
    assert before[RMS] == 1 and before[FUSED] == 0
    if reason is not None:
        assert any(reason in m for m in context.near_misses), context.near_misses
    for g, w in zip(as_tuple(gm(*args)), as_tuple(fn(*args))):
        torch.testing.assert_close(g, w, **TOL[dtype])
