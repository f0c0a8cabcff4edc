"""Build ATen graphs like the pipeline's and run single passes on them."""
from __future__ import annotations

from collections import Counter

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from infer.compiler.inner import decomposition_table
from infer.passes.base import PassContext


def aten_graph(fn, *args):
    """Trace `fn` to a functional ATen graph whose nodes carry fake-tensor `val` metadata."""
    with torch.no_grad():
        return make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*args)


def context_for(gm, static: dict[int, torch.Tensor] | None = None) -> PassContext:
    """A pass context; `static` maps positional input indices to the real weights behind them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static_inputs = {placeholders[i].name: t for i, t in (static or {}).items()}
    return PassContext(static_inputs=static_inputs)


def op_counts(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_pass(pass_cls, gm, static=None, *pass_args):
    context = context_for(gm, static)
    rewrites = pass_cls(context, *pass_args)(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return rewrites, context
