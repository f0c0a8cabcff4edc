"""Saving an ATen graph with symbolic fake values and loading it back."""
import json
import operator

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from infer.compiler.graph_io import Unsupported, dump_graph, load_graph


def _f(x, w, b):
    n = x.shape[0]
    y = torch.nn.functional.linear(x, w, b).view(n, 2, -1)  # [T, 2, 8]
    return torch.cat([y.float(), y.sum(-1, keepdim=True)], dim=-1).flatten(1)[:, 1:], n * 2


def _graph(dtype=torch.bfloat16):
    args = (torch.randn(5, 8, dtype=dtype), torch.randn(16, 8, dtype=dtype), torch.randn(16, dtype=dtype))
    gm = make_fx(_f, tracing_mode="symbolic")(*args)
    return gm, args


def _shape_kind(v):
    return [d if isinstance(d, int) else "sym" for d in v.shape]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_keeps_code_and_values(dtype):
    gm, args = _graph(dtype)
    data = json.loads(json.dumps(dump_graph(gm.graph)))  # through text, as the cache stores it
    loaded = fx.GraphModule(torch.nn.Module(), load_graph(data))
    assert loaded.code == gm.code
    for old, new in zip(gm.graph.nodes, loaded.graph.nodes):
        a, b = old.meta.get("val"), new.meta.get("val")
        assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), old.name
        if isinstance(a, torch.Tensor):
            assert (a.dtype, a.device, _shape_kind(a)) == (b.dtype, b.device, _shape_kind(b)), old.name
            assert [s if isinstance(s, int) else "sym" for s in a.stride()] == \
                   [s if isinstance(s, int) else "sym" for s in b.stride()], old.name
    out, n2 = loaded(*args)
    expected, m2 = _f(*args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert n2 == m2


def test_symbols_become_one_fresh_unbacked_symbol_each():
    gm, _ = _graph()
    loaded = load_graph(dump_graph(gm.graph))
    x = loaded.find_nodes(op="placeholder")[0].meta["val"]
    view = next(n for n in loaded.nodes if n.target is torch.ops.aten.view.default).meta["val"]
    assert str(x.shape[0]) == str(view.shape[0]) == "u0"  # the same size in both


def test_values_only_for_the_nodes_asked():
    gm, _ = _graph()
    loaded = load_graph(dump_graph(gm.graph), lambda g: g.find_nodes(op="placeholder"))
    assert all("val" in n.meta for n in loaded.find_nodes(op="placeholder"))
    assert not any("val" in n.meta for n in loaded.nodes if n.op == "call_function")


def test_what_cannot_be_saved_exactly_is_refused():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda t: t + 1, (x,)))
    with pytest.raises(Unsupported, match="target"):
        dump_graph(graph)
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.add, (x, object())))
    with pytest.raises(Unsupported, match="argument"):
        dump_graph(graph)
    graph = fx.Graph()
    graph.output(graph.call_module("sub", (graph.placeholder("x"),)))
    with pytest.raises(Unsupported, match="call_module"):
        dump_graph(graph)
