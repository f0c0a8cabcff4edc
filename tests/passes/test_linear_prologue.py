"""LinearProloguePass: a norm, residual add + norm or SiLU-and-mul feeding a projection joins it."""
import operator

import pytest
import torch
import torch.nn.functional as F

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.fused_add_rms_norm import FusedAddRMSNormPass
from infer.passes.linear_prologue import LinearProloguePass
from infer.passes.rms_norm import RMSNormPass
from infer.passes.silu_and_mul import SiluAndMulPass

EPS = 1e-6
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def rms(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def block(x, res, nw, w_qkv, w_o, w_gate_up, w_down):
    """A decoder layer's matmul chain on [T, H]: norm -> qkv, o, add+norm -> gate_up, SiLU -> down."""
    qkv = F.linear(rms(x, nw), w_qkv)
    h = F.linear(qkv[:, : x.shape[1]], w_o) + res
    gate, up = F.linear(rms(h, nw), w_gate_up).chunk(2, -1)
    return F.linear(F.silu(gate) * up, w_down) + h


def prepare(fn, *args):
    """Trace and run the passes that precede LinearProloguePass in the pipeline."""
    gm = aten_graph(fn, *args)
    for cls in (RMSNormPass, FusedAddRMSNormPass, SiluAndMulPass):
        run_pass(cls, gm)
    return gm


def block_args(dtype, t=3, hidden=32, inter=48):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (r(t, hidden), r(t, hidden), r(hidden), r(3 * hidden, hidden), r(hidden, hidden), r(2 * inter, hidden),
            r(hidden, inter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_chain_fuses_every_prologue(dtype):
    args = block_args(dtype)
    gm = prepare(block, *args)
    before = op_counts(gm)
    assert before["aten.mm.default"] == 4 and before["infer.silu_and_mul.default"] == 1
    rewrites, _ = run_pass(LinearProloguePass, gm)
    after = op_counts(gm)
    assert rewrites == 4
    assert after["infer.rms_norm_linear.default"] == 1 and after["infer.add_rms_norm_linear.default"] == 1
    assert after["infer.silu_mul_linear.default"] == 1 and after["infer.linear.default"] == 1
    assert after["aten.mm.default"] == 0 and after["infer.rms_norm.default"] == 0
    assert after["infer.fused_add_rms_norm.default"] == 0
    torch.testing.assert_close(gm(*args), block(*args), **TOL[dtype])


def test_separate_gate_and_up_keep_their_shared_norm():
    """Two projections read one norm: fusing would compute it twice, so both stay plain linears."""
    def fn(x, res, nw, w_gate, w_up):
        y = rms(x + res, nw)
        return F.linear(y, w_gate) * F.linear(y, w_up)

    args = (torch.randn(3, 16), torch.randn(3, 16), torch.randn(16), torch.randn(8, 16), torch.randn(8, 16))
    gm = prepare(fn, *args)
    run_pass(LinearProloguePass, gm)
    counts = op_counts(gm)
    assert counts["infer.linear.default"] == 2 and counts["infer.fused_add_rms_norm.default"] == 1
    assert counts["infer.add_rms_norm_linear.default"] == 0
    torch.testing.assert_close(gm(*args), fn(*args), atol=1e-5, rtol=1e-5)


def test_norm_with_another_user_stays():
    def fn(x, nw, w):
        n = rms(x, nw)
        return F.linear(n, w), n * 2

    args = (torch.randn(4, 16), torch.randn(16), torch.randn(8, 16))
    gm = prepare(fn, *args)
    run_pass(LinearProloguePass, gm)
    counts = op_counts(gm)
    assert counts["infer.rms_norm.default"] == 1 and counts["infer.linear.default"] == 1
    assert counts["infer.rms_norm_linear.default"] == 0
    torch.testing.assert_close(gm(*args)[0], fn(*args)[0], atol=1e-5, rtol=1e-5)


def test_left_alone_matmuls():
    def fn(x, w, b, y):
        scaled = torch.addmm(b, x, w.t(), beta=0.5)  # alpha/beta: not a plain linear
        plain = x @ y  # right operand is not a transposed weight
        return scaled, plain

    args = (torch.randn(4, 16), torch.randn(8, 16), torch.randn(8), torch.randn(16, 8))
    gm = aten_graph(fn, *args)
    rewrites, context = run_pass(LinearProloguePass, gm)
    assert rewrites == 0 and op_counts(gm)["infer.linear.default"] == 0
    assert any("alpha/beta" in m for m in context.near_misses)


def test_bias_and_sum_users_before_the_matmul():
    """addmm with a bias vector; the residual sum is also used before the projection."""
    def fn(x, res, nw, w, b):
        h = x + res
        early = h * 3  # a user of the sum placed before the matmul
        return F.linear(rms(h, nw), w, b), early

    args = (torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(8, 16), torch.randn(8))
    gm = prepare(fn, *args)
    assert run_pass(LinearProloguePass, gm)[0] == 1
    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.infer.add_rms_norm_linear.default]
    assert len(nodes) == 1 and nodes[0].args[-1] is not None
    assert sum(1 for n in gm.graph.nodes if n.target is operator.getitem) == 2
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
