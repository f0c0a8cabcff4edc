"""Folds what feeds a weight matmul (RMSNorm, residual add + RMSNorm, SiLU-and-mul) into the matmul.

At decode batch sizes a projection is a weight-streaming GEMV, and the norm or activation before
it is a separate latency-bound launch; :mod:`infer.runtime.ops.linear` runs both as one kernel
for few rows and as the unfused chain for many.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .base import InferPass, is_op
from .patterns import aten, node_order, tensor_val

infer = torch.ops.infer


class LinearProloguePass(InferPass):
    """Runs after the norm, GEMM-packing and activation passes.

    Before::

        n = infer.rms_norm(x, nw, eps, c, dt)            # or getitem(fused_add_rms_norm(...), 0)
        y = aten.mm(n, aten.permute(W, [1, 0]))          # or addmm(b, n, permute(W)), or mm(silu_and_mul(g, u), ...)

    After::

        y = infer.rms_norm_linear(x, nw, eps, c, dt, W, None)
        # add_rms_norm_linear(x, r, nw, ...) -> (y, s) / silu_mul_linear(g, u, W, b) / linear(a, W, b)

    Left alone: matmuls whose right operand is not a transposed 2-d tensor, ``addmm`` with
    ``alpha``/``beta`` or a non-vector bias, and prologues with other users (the norm or
    activation output is needed anyway, so fusing would compute it twice).
    """

    name = "linear_prologue"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        order = _Order(graph)
        for mm in list(graph.nodes):
            parts = self._linear_parts(mm)
            if parts is None:
                continue
            a, weight, bias = parts
            if self._rewrite(graph, mm, a, weight, bias, order):
                rewrites += 1
        return rewrites

    def _linear_parts(self, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
        """``(a, W, bias)`` of ``a @ W.T (+ bias)``, or None."""
        if is_op(node, aten.mm.default):
            a, wt = node.args
            bias = None
        elif is_op(node, aten.addmm.default):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                self.context.near_miss(self.name, node, "addmm with alpha/beta")
                return None
            bias, a, wt = node.args
            bias_val = tensor_val(bias)
            if bias_val is None or bias_val.dim() != 1:
                self.context.near_miss(self.name, node, "addmm bias is not a vector")
                return None
        else:
            return None
        transposed = (is_op(wt, aten.permute.default) and list(wt.args[1]) == [1, 0]) or is_op(wt, aten.t.default)
        if not transposed:
            return None
        weight = wt.args[0]
        a_val, w_val = tensor_val(a), tensor_val(weight)
        if a_val is None or w_val is None or a_val.dim() != 2 or w_val.dim() != 2 or a_val.dtype != w_val.dtype:
            return None
        return a, weight, bias

    def _rewrite(self, graph: fx.Graph, mm: fx.Node, a: fx.Node, weight: fx.Node, bias: fx.Node | None,
                 order: _Order) -> bool:
        sole = len(a.users) == 1
        if sole and is_op(a, infer.rms_norm.default) and tensor_val(a.args[0]).dim() == 2:
            x, nw, eps, cast, dt = a.args
            self._replace(graph, mm, mm, infer.rms_norm_linear.default, (x, nw, eps, cast, dt, weight, bias))
            return True
        if sole and is_op(a, infer.silu_and_mul.default) and tensor_val(a.args[0]).dim() == 2:
            gate, up = a.args
            self._replace(graph, mm, mm, infer.silu_mul_linear.default, (gate, up, weight, bias))
            return True
        fused = a.args[0] if is_op(a, operator.getitem) and a.args[1] == 0 else None
        if sole and is_op(fused, infer.fused_add_rms_norm.default) and tensor_val(fused.args[0]).dim() == 2:
            return self._rewrite_add_norm(graph, mm, fused, weight, bias, order)
        self._replace(graph, mm, mm, infer.linear.default, (a, weight, bias))
        return True

    def _rewrite_add_norm(self, graph: fx.Graph, mm: fx.Node, fused: fx.Node, weight: fx.Node,
                          bias: fx.Node | None, order: _Order) -> bool:
        """``fused_add_rms_norm`` -> getitem 0 -> mm: one op giving ``(y, s)``."""
        sums = [u for u in fused.users if u.args[1] == 1]
        uses = [u for s in sums for u in s.users]
        deps = [t for t in (weight, bias) if isinstance(t, fx.Node)]
        pos = order.of([mm, fused, *uses, *deps])
        # The new op must precede every user of the sum and follow the weight/bias.
        first_sum_use = min((pos[u] for u in uses), default=None)
        if first_sum_use is None or first_sum_use > pos[mm]:
            where = mm
        elif all(pos[t] < pos[fused] for t in deps):
            where = fused
        else:
            self.context.near_miss(self.name, mm, "the residual sum is used before the weight is available")
            return False
        new = self._replace(graph, where, mm, infer.add_rms_norm_linear.default, (*fused.args, weight, bias),
                            val=(tensor_val(mm), fused.meta["val"][1]))
        with graph.inserting_after(new):
            y = graph.call_function(operator.getitem, (new, 0))
            s = graph.call_function(operator.getitem, (new, 1))
        y.meta["val"], s.meta["val"] = new.meta["val"]
        mm.replace_all_uses_with(y)
        for old in sums:
            old.replace_all_uses_with(s)
        return True

    @staticmethod
    def _replace(graph: fx.Graph, where: fx.Node, mm: fx.Node, target, args: tuple, val=None) -> fx.Node:
        with graph.inserting_before(where):
            new = graph.call_function(target, args)
        new.meta["val"] = tensor_val(mm) if val is None else val
        if val is None:
            mm.replace_all_uses_with(new)
        return new


class _Order:
    """Graph positions, counted once and again only when a node inserted since is asked about.

    The pass inserts nodes but never moves or erases one, so positions counted earlier still
    order the nodes that existed then; every position one query returns comes from one count.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._positions = node_order(graph)

    def of(self, nodes: list[fx.Node]) -> dict[fx.Node, int]:
        if any(n not in self._positions for n in nodes):
            self._positions = node_order(self.graph)
        return self._positions
