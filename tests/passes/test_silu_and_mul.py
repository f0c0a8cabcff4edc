"""SiluAndMulPass: `silu(gate) * up` in any spelling becomes one `infer.silu_and_mul`."""
import operator

import pytest
import torch
import torch.nn.functional as F

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.silu_and_mul import SiluAndMulPass

FUSED = "infer.silu_and_mul.default"
# every op the decomposed silu and the gating multiply may leave behind
SILU_OPS = ("aten.mul.Tensor", "aten.div.Tensor", "aten.exp.default", "aten.neg.default",
            "aten.sigmoid.default", "aten.silu.default", "prims.convert_element_type.default")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [48, 96, 100, 128]
LEADING = [(7,), (2, 3)]  # [T, I] and [B, S, I]
SILU = torch.nn.SiLU()

# name -> act(gate, up)
SPELLINGS = {
    "silu_times_up": lambda a, b: F.silu(a) * b,
    "up_times_silu": lambda a, b: b * F.silu(a),
    "sigmoid": lambda a, b: a * torch.sigmoid(a) * b,
    "sigmoid_first": lambda a, b: b * (torch.sigmoid(a) * a),
    "module": lambda a, b: SILU(a) * b,
}


def build(spelling, source, dtype, leading, hidden):
    """(fn, args, gate/up source nodes' description) for separate tensors or two halves of one."""
    act = SPELLINGS[spelling]
    if source == "separate":
        args = (torch.randn(*leading, hidden, dtype=dtype), torch.randn(*leading, hidden, dtype=dtype))
        return act, args

    def fn(x):  # [..., 2*I]: gate and up halves of one GEMM output
        gate, up = x.chunk(2, -1)
        return act(gate, up)
    return fn, (torch.randn(*leading, 2 * hidden, dtype=dtype),)


def only_fused(gm):
    nodes = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    assert len(nodes) == 1, gm.graph
    return nodes[0]


def traced_clean(fn, *args):
    gm = aten_graph(fn, *args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@pytest.mark.parametrize("leading", LEADING, ids=["TI", "BSI"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("source", ["separate", "chunk"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spelling_fused_to_one_op(spelling, source, dtype, hidden, leading):
    fn, args = build(spelling, source, dtype, leading, hidden)
    gm = aten_graph(fn, *args)
    assert op_counts(gm)[FUSED] == 0

    rewrites, _ = run_pass(SiluAndMulPass, gm)

    after = op_counts(gm)
    assert rewrites == 1 and after[FUSED] == 1
    assert all(after[op] == 0 for op in SILU_OPS), after
    gate, up = only_fused(gm).args
    if source == "separate":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert (gate, up) == tuple(placeholders)
    else:  # the two halves of one split, gate first
        assert gate.target is operator.getitem and up.target is operator.getitem
        assert gate.args[0] is up.args[0] and (gate.args[1], up.args[1]) == (0, 1)
    out, expected = gm(*args), fn(*args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_times_own_input_is_silu_and_mul_of_itself(dtype):
    """`silu(a) * a` is a legitimate silu_and_mul(a, a)."""
    def fn(a):
        return F.silu(a) * a

    a = torch.randn(5, 96, dtype=dtype)
    gm = aten_graph(fn, a)
    rewrites, _ = run_pass(SiluAndMulPass, gm)
    assert rewrites == 1 and op_counts(gm) == {FUSED: 1}
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert only_fused(gm).args == (x, x)
    torch.testing.assert_close(gm(a), fn(a), **TOL[dtype])


def test_two_mlps_fused_independently():
    def fn(x, y):
        g, u = x.chunk(2, -1)
        return F.silu(g) * u + F.silu(y) * y.flip(0)

    args = torch.randn(4, 200, dtype=torch.bfloat16), torch.randn(4, 100, dtype=torch.bfloat16)
    gm = aten_graph(fn, *args)
    rewrites, _ = run_pass(SiluAndMulPass, gm)
    assert rewrites == 2 and op_counts(gm)[FUSED] == 2
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.bfloat16])


def silu_also_returned(a, b):
    s = F.silu(a)
    return s * b, s


def sigmoid_also_returned(a, b):
    sig = torch.sigmoid(a)
    return a * sig * b, sig


# name -> (fn, up shape from the gate's, near-miss reason the pass must record or None)
NOT_MATCHING = {
    "gelu": (lambda a, b: F.gelu(a) * b, lambda s: s, None),
    "gelu_tanh": (lambda a, b: F.gelu(a, approximate="tanh") * b, lambda s: s, None),
    "sigmoid_only": (lambda a, b: torch.sigmoid(a) * b, lambda s: s, None),
    "broadcast_up": (lambda a, b: F.silu(a) * b, lambda s: s[-1:], "shapes differ"),
    "broadcast_gate": (lambda a, b: F.silu(b) * a, lambda s: s[-1:], "shapes differ"),
    "silu_also_returned": (silu_also_returned, lambda s: s, None),
    "sigmoid_also_returned": (sigmoid_also_returned, lambda s: s, None),
}


@pytest.mark.parametrize("leading", LEADING, ids=["TI", "BSI"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(NOT_MATCHING))
def test_not_matched(case, dtype, leading):
    fn, up_shape, reason = NOT_MATCHING[case]
    gate_shape = (*leading, 100)
    args = torch.randn(gate_shape, dtype=dtype), torch.randn(up_shape(gate_shape), dtype=dtype)
    gm = traced_clean(fn, *args)
    before, code = op_counts(gm), gm.code

    rewrites, context = run_pass(SiluAndMulPass, gm)

    assert rewrites == 0
    assert op_counts(gm) == before and gm.code == code
    if reason is not None:
        assert any(reason in m for m in context.near_misses), context.near_misses
    got, want = gm(*args), fn(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_strided_result_is_left_alone():
    """On transposed gate/up eager keeps the transposed layout, and later code may view the result
    as such; the op would return it contiguous."""
    def fn(gate, up):  # [B, S, I]
        a = F.silu(gate.transpose(0, 1)) * up.transpose(0, 1)  # [S, B, I], strided like its inputs
        return a.transpose(0, 1).view(6, 16)  # a view only for a's own layout

    args = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    gm = traced_clean(fn, *args)

    rewrites, context = run_pass(SiluAndMulPass, gm)

    assert rewrites == 0
    assert any("not contiguous" in m for m in context.near_misses), context.near_misses
    torch.testing.assert_close(gm(*args), fn(*args), **TOL[torch.float32])  # the decomposed silu
