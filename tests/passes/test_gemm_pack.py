"""GemmPackPass: linears sharing an input and static weights become one GEMM on packed weights."""
import pytest
import torch
import torch.nn.functional as F

from fx_helpers import aten_graph, op_counts, run_pass
from infer.passes.gemm_pack import GemmPackPass, pack_in_place

MM, ADDMM, SLICE = "aten.mm.default", "aten.addmm.default", "aten.slice.Tensor"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16]
HIDDEN = [48, 96, 100, 128]
LEADING = [(7,), (2, 3)]  # [T, K] and [B, S, K]


def qkv(x, wq, wk, wv):
    return F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)


def qkv_bias(x, wq, wk, wv, bq, bk, bv):
    return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)


def gate_up(x, wg, wu):
    return F.linear(x, wg), F.linear(x, wu)


def weights(hidden, widths, dtype):
    return [torch.randn(n, hidden, dtype=dtype) / hidden ** 0.5 for n in widths]  # [N_i, K]


def widths_for(hidden):
    return hidden, hidden // 2, hidden // 4  # three different output sizes


def storage(t):
    return t.untyped_storage().data_ptr()


def assert_views_of(packed, tensors):
    """Each tensor is the next block of rows of `packed`, in the same storage."""
    offset = packed.storage_offset()
    for t in tensors:
        assert storage(t) == storage(packed)
        assert t.storage_offset() == offset
        offset += t.numel()
    assert offset == packed.storage_offset() + packed.numel()


def check_outputs(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[dtype])


def packed_slices(gm):
    return [tuple(n.args[1:]) for n in gm.graph.nodes if str(n.target) == SLICE]


@pytest.mark.parametrize("leading", LEADING, ids=["TK", "BSK"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_packed_into_one_gemm(dtype, hidden, leading):
    x = torch.randn(*leading, hidden, dtype=dtype)
    ws = weights(hidden, widths_for(hidden), dtype)
    want = qkv(x, *ws)
    gm = aten_graph(qkv, x, *ws)
    assert op_counts(gm)[MM] == 3

    rewrites, context = run_pass(GemmPackPass, gm, static={1: ws[0], 2: ws[1], 3: ws[2]})

    after = op_counts(gm)
    assert rewrites == 1 and context.fusions == {"pack(wq,wk,wv)": 1}
    assert after[MM] == 1 and after[SLICE] == 3 and after["aten.permute.default"] == 1
    nq, nk, nv = widths_for(hidden)
    assert packed_slices(gm) == [(1, 0, nq), (1, nq, nq + nk), (1, nq + nk, nq + nk + nv)]
    if len(leading) == 2:  # [T, N] column slices viewed as [B, S, N]: still valid views, kept
        assert after["aten.view.default"] == 4 and after["aten.reshape.default"] == 0
    assert len(context.extra_inputs) == 1
    packed = context.extra_inputs[0]
    assert packed.shape == (nq + nk + nv, hidden)
    assert_views_of(packed, ws)
    check_outputs(gm(x, *ws, *context.extra_inputs), want, dtype)


@pytest.mark.parametrize("leading", LEADING, ids=["TK", "BSK"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_weight_update_reaches_packed_gemm(dtype, leading):
    x = torch.randn(*leading, 100, dtype=dtype)
    ws = weights(100, widths_for(100), dtype)
    gm = aten_graph(qkv, x, *ws)
    _, context = run_pass(GemmPackPass, gm, static={1: ws[0], 2: ws[1], 3: ws[2]})

    new_q, new_v = weights(100, (100, 25), dtype)
    ws[0].copy_(new_q)
    ws[2].copy_(new_v)

    got = gm(x, *ws, *context.extra_inputs)
    check_outputs(got, qkv(x, new_q, ws[1], new_v), dtype)
    torch.testing.assert_close(context.extra_inputs[0][:100], new_q, rtol=0, atol=0)


@pytest.mark.parametrize("leading", LEADING, ids=["TK", "BSK"])
@pytest.mark.parametrize("hidden", [48, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_with_biases_packs_biases_too(dtype, hidden, leading):
    x = torch.randn(*leading, hidden, dtype=dtype)
    ws = weights(hidden, widths_for(hidden), dtype)
    bs = [torch.randn(n, dtype=dtype) for n in widths_for(hidden)]
    gm = aten_graph(qkv_bias, x, *ws, *bs)
    assert op_counts(gm)[ADDMM] == 3

    static = dict(enumerate(ws + bs, start=1))
    rewrites, context = run_pass(GemmPackPass, gm, static=static)

    after = op_counts(gm)
    assert rewrites == 1 and context.fusions == {"pack(wq,wk,wv)": 1}
    assert after[ADDMM] == 1 and after[MM] == 0 and after[SLICE] == 3
    packed_w, packed_b = context.extra_inputs
    assert_views_of(packed_w, ws)
    assert_views_of(packed_b, bs)
    check_outputs(gm(x, *ws, *bs, *context.extra_inputs), qkv_bias(x, *ws, *bs), dtype)
    bs[1].copy_(torch.randn_like(bs[1]))
    check_outputs(gm(x, *ws, *bs, *context.extra_inputs), qkv_bias(x, *ws, *bs), dtype)


@pytest.mark.parametrize("leading", LEADING, ids=["TK", "BSK"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_gate_up_two_way(hidden, leading):
    dtype = torch.bfloat16
    x = torch.randn(*leading, hidden, dtype=dtype)
    ws = weights(hidden, (3 * hidden, 3 * hidden), dtype)
    gm = aten_graph(gate_up, x, *ws)

    rewrites, context = run_pass(GemmPackPass, gm, static={1: ws[0], 2: ws[1]})

    assert rewrites == 1 and context.fusions == {"pack(wg,wu)": 1}
    assert op_counts(gm)[MM] == 1 and op_counts(gm)[SLICE] == 2
    assert_views_of(context.extra_inputs[0], ws)
    check_outputs(gm(x, *ws, *context.extra_inputs), gate_up(x, *ws), dtype)


def test_two_groups_in_one_graph():
    def fn(x, y, wq, wk, wv, wg, wu):
        return (*qkv(x, wq, wk, wv), *gate_up(y, wg, wu))

    x, y = torch.randn(5, 48), torch.randn(5, 48)
    ws = weights(48, (48, 16, 16, 64, 64), torch.float32)
    gm = aten_graph(fn, x, y, *ws)
    rewrites, context = run_pass(GemmPackPass, gm, static=dict(enumerate(ws, start=2)))
    assert rewrites == 2 and context.fusions == {"pack(wq,wk,wv)": 1, "pack(wg,wu)": 1}
    assert op_counts(gm)[MM] == 2 and len(context.extra_inputs) == 2
    check_outputs(gm(x, y, *ws, *context.extra_inputs), fn(x, y, *ws), torch.float32)


def test_second_compile_reuses_packed_storage():
    """A recompile (new trace, same weights) packs into the storage the first one made."""
    x = torch.randn(4, 48)
    ws = weights(48, (48, 16, 16), torch.float32)
    first = aten_graph(qkv, x, *ws)
    _, ctx1 = run_pass(GemmPackPass, first, static={1: ws[0], 2: ws[1], 3: ws[2]})
    x2 = torch.randn(9, 48)
    second = aten_graph(qkv, x2, *ws)
    _, ctx2 = run_pass(GemmPackPass, second, static={1: ws[0], 2: ws[1], 3: ws[2]})
    assert ctx2.extra_inputs[0].data_ptr() == ctx1.extra_inputs[0].data_ptr()
    assert_views_of(ctx2.extra_inputs[0], ws)
    check_outputs(second(x2, *ws, *ctx2.extra_inputs), qkv(x2, *ws), torch.float32)
    check_outputs(first(x, *ws, *ctx1.extra_inputs), qkv(x, *ws), torch.float32)


def test_pack_in_place_twice_reuses_storage():
    ws = weights(24, (8, 12, 4), torch.bfloat16)
    originals = [w.clone() for w in ws]
    first = pack_in_place(ws)
    assert_views_of(first, ws)
    second = pack_in_place(ws)
    assert second.data_ptr() == first.data_ptr() and second.shape == first.shape == (24, 24)
    torch.testing.assert_close(second, torch.cat(originals), rtol=0, atol=0)
    for w, orig in zip(ws, originals):
        torch.testing.assert_close(w, orig, rtol=0, atol=0)


def test_pack_in_place_other_order_makes_new_storage():
    ws = weights(24, (8, 12), torch.float32)
    first = pack_in_place(ws)
    swapped = pack_in_place(ws[::-1])
    assert swapped.data_ptr() != first.data_ptr()
    assert_views_of(swapped, ws[::-1])
    torch.testing.assert_close(swapped, torch.cat([first[8:], first[:8]]), rtol=0, atol=0)


def run_unchanged(fn, args, static):
    """Trace `fn`, run the pass with `static`; assert nothing changed and numbers still hold."""
    gm = aten_graph(fn, *args)
    gm.graph.eliminate_dead_code()  # decomposition leftovers, so only the pass can change the graph
    gm.recompile()
    before, code = op_counts(gm), gm.code
    ptrs = [storage(t) for t in static.values()]
    rewrites, context = run_pass(GemmPackPass, gm, static=static)
    assert rewrites == 0 and context.extra_inputs == [] and context.fusions == {}
    assert op_counts(gm) == before and gm.code == code
    assert [storage(t) for t in static.values()] == ptrs
    return gm


@pytest.mark.parametrize("leading", LEADING, ids=["TK", "BSK"])
def test_activation_weights_not_packed(leading):
    x = torch.randn(*leading, 48)
    ws = weights(48, (48, 16, 16), torch.float32)
    gm = run_unchanged(qkv, (x, *ws), static={})
    check_outputs(gm(x, *ws), qkv(x, *ws), torch.float32)


def test_single_linear_not_packed():
    def fn(x, w):
        return F.linear(x, w) * 2

    x, (w,) = torch.randn(5, 48), weights(48, (32,), torch.float32)
    gm = run_unchanged(fn, (x, w), static={1: w})
    torch.testing.assert_close(gm(x, w), fn(x, w), **TOL[torch.float32])


def test_different_weight_dtypes_not_packed():
    def fn(x, w32, w16):
        return F.linear(x, w32), F.linear(x.to(torch.bfloat16), w16)

    x = torch.randn(5, 48)
    (w32,), (w16,) = weights(48, (32,), torch.float32), weights(48, (16,), torch.bfloat16)
    gm = run_unchanged(fn, (x, w32, w16), static={1: w32, 2: w16})
    check_outputs(gm(x, w32, w16), fn(x, w32, w16), torch.bfloat16)


def test_static_weights_of_mixed_dtype_not_grouped():
    """The dtype guard itself: one input, but the real weights behind it differ in dtype."""
    x = torch.randn(5, 48)
    wq, wk = weights(48, (32, 16), torch.float32)
    run_unchanged(gate_up, (x, wq, wk), static={1: wq, 2: wk.to(torch.bfloat16)})


def shared_as_right_operand(x, w1, w2):
    return F.linear(x, w1), w2 @ x.t()  # x is the transposed (right) operand of the second mm


def untransposed_weight(x, w1, w2):
    return F.linear(x, w1), x @ w2.t().contiguous()  # second weight is a [K, N] tensor, no permute


def identity_permutes(x, w1, w2):
    return x @ w1.permute(0, 1), x @ w2.permute(0, 1)  # [K, N] weights: permute, but not a transpose


@pytest.mark.parametrize("fn", [shared_as_right_operand, untransposed_weight, identity_permutes])
def test_mm_that_is_not_a_linear_not_packed(fn):
    x = torch.randn(5, 48)
    w1, w2 = weights(48, (32, 16), torch.float32)
    if fn is identity_permutes:
        w1, w2 = w1[:16].t().contiguous(), w2.t().contiguous()  # [K, 16] each
    gm = run_unchanged(fn, (x, w1, w2), static={1: w1, 2: w2})
    check_outputs(gm(x, w1, w2), fn(x, w1, w2), torch.float32)


def test_weight_shared_by_two_groups_stays_live():
    def fn(x, y, wa, wb, wc):
        return F.linear(x, wa), F.linear(x, wb), F.linear(y, wa), F.linear(y, wc)

    x, y = torch.randn(5, 48), torch.randn(5, 48)
    ws = weights(48, (16, 8, 24), torch.float32)
    gm = aten_graph(fn, x, y, *ws)
    _, context = run_pass(GemmPackPass, gm, static=dict(enumerate(ws, start=2)))
    ws[0].copy_(torch.randn_like(ws[0]))
    check_outputs(gm(x, y, *ws, *context.extra_inputs), fn(x, y, *ws), torch.float32)


class _EagerAttention(torch.nn.Module):
    """q/k/v projections viewed per head, transposed and multiplied in 4-D (HF's eager attention)."""

    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):  # [B, S, C]
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, S, D], strided once packed
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5  # flattens with a view
        out = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


def _chain(x, wq, wk, wv):
    """slice -> view -> transpose -> 4-D matmul, as above, traced to ATen for the pass alone."""
    b, s, c = x.shape
    q, k, v = (F.linear(x, w).view(b, s, 4, c // 4).transpose(1, 2) for w in (wq, wk, wv))
    return torch.matmul(torch.matmul(q, k.transpose(2, 3)), v).transpose(1, 2).reshape(b, s, c)


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 1), (1, 5), (3, 4)])
def test_views_downstream_of_the_pack_stay_valid(batch, length):
    """Once packed, a slice's row stride is the pack's: a view further down (the matmul's flatten)
    that the new strides make invalid becomes a reshape; the values are eager's."""
    x = torch.randn(batch, length, 32)
    ws = weights(32, (32, 32, 32), torch.float32)
    want = _chain(x, *ws)
    gm = aten_graph(_chain, x, *ws)
    rewrites, context = run_pass(GemmPackPass, gm, static={1: ws[0], 2: ws[1], 3: ws[2]})
    assert rewrites == 1 and op_counts(gm)[MM] == 1, context.near_misses
    # eager flattens [B, H, S, D] with a view where B and H merge (one token) and copies elsewhere;
    # with the pack's row stride they no longer merge at batch > 1, so that view became a reshape
    assert (op_counts(gm)["aten.reshape.default"] > 0) == (batch > 1 and length == 1)
    got = _LayoutCheck(gm).run(x, *ws, *context.extra_inputs)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


class _LayoutCheck(torch.fx.Interpreter):
    """Runs the graph and checks that every value recorded on it has its run-time strides."""

    def run_node(self, node):
        out = super().run_node(node)
        val = node.meta.get("val")
        if isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and out.numel() > 1:
            strides = lambda t: [st for n, st in zip(t.shape, t.stride()) if n > 1]  # noqa: E731 (size 1: any)
            assert tuple(out.shape) == tuple(val.shape) and strides(out) == strides(val), \
                (node.name, node.target, out.stride(), val.stride())
        return out


@pytest.mark.parametrize("inner,batch,length", [("eager", 1, 1), ("eager", 2, 1), ("eager", 1, 3), ("eager", 2, 3),
                                                ("inductor", 2, 1)])
def test_compiled_eager_attention_after_packing_matches_eager(inner, batch, length):
    """torch.compile(backend='infer') of 4-D eager attention over packed q/k/v (one token and more)."""
    torch.manual_seed(0)
    model = _EagerAttention().eval()
    x = torch.randn(batch, length, 32)
    with torch.inference_mode():
        want = model(x)
        got = torch.compile(model, backend="infer", options={"inner_compiler": inner})(x)
    import infer.compiler as ic
    assert ic.last_report().fusions == {"pack(q,k,v)": 1}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
