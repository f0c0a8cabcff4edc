"""Fuses a residual add feeding an `infer::rms_norm` into `infer::fused_add_rms_norm`."""
from __future__ import annotations

import operator

import torch
from torch import fx

from .base import InferPass, is_op
from .patterns import aten, node_order, tensor_val


class FusedAddRMSNormPass(InferPass):
    """Runs after `RMSNormPass`.

    Before::

        s = aten.add(h, residual)            # s may also feed the next residual add
        y = infer.rms_norm(s, w, eps, ...)

    After::

        f = infer.fused_add_rms_norm(h, residual, w, eps, ...)
        y = f[0]; s = f[1]

    Left alone: adds with `alpha`, broadcasting adds, and sums whose other users come before the
    norm when the weight is computed after the add (no valid place for the fused op). A strided
    sum never gets here: the norm keeps its input's layout, and `RMSNormPass` leaves a norm with
    a strided result alone.
    """

    name = "fused_add_rms_norm"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        order = node_order(graph)
        for norm in list(graph.nodes):
            if not is_op(norm, torch.ops.infer.rms_norm.default):
                continue
            total = norm.args[0]
            if not is_op(total, aten.add.Tensor) or total.kwargs.get("alpha", 1) != 1:
                continue
            a, b = total.args
            a_val, b_val, s_val = tensor_val(a), tensor_val(b), tensor_val(total)
            if a_val is None or b_val is None or not (a_val.shape == b_val.shape == s_val.shape):
                self.context.near_miss(self.name, norm, "the add broadcasts or has a scalar operand")
                continue
            where = self._insertion_point(total, norm, order)
            if where is None:
                self.context.near_miss(self.name, norm, "sum used before the norm and weight computed after it")
                continue
            self._rewrite(graph, total, norm, where)
            rewrites += 1
        return rewrites

    @staticmethod
    def _insertion_point(total: fx.Node, norm: fx.Node, order: dict) -> fx.Node | None:
        if all(order[u] >= order[norm] for u in total.users):
            return norm
        weight = norm.args[1]  # (x, weight, eps, cast_before_weight, out_dtype)
        if weight is None or order[weight] < order[total]:
            return total.next
        return None

    @staticmethod
    def _rewrite(graph: fx.Graph, total: fx.Node, norm: fx.Node, where: fx.Node) -> None:
        x, weight, eps, cast_before_weight, out_dtype = norm.args
        a, b = total.args
        with graph.inserting_before(where):
            fused = graph.call_function(torch.ops.infer.fused_add_rms_norm.default,
                                        (a, b, weight, eps, cast_before_weight, out_dtype))
            normed = graph.call_function(operator.getitem, (fused, 0))
            new_sum = graph.call_function(operator.getitem, (fused, 1))
        fused.meta["val"] = (norm.meta.get("val"), total.meta.get("val"))
        normed.meta["val"], new_sum.meta["val"] = norm.meta.get("val"), total.meta.get("val")
        norm.replace_all_uses_with(normed)
        total.replace_all_uses_with(new_sum)
