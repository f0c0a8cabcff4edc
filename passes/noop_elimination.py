"""Removes ops that return their input unchanged, and collapses chains of views."""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from .base import InferPass, is_op, node_value
from .patterns import VIEWS

aten = torch.ops.aten
prims = torch.ops.prims

_VIEWS = VIEWS + (aten.reshape.default,)


class NoopEliminationPass(InferPass):
    """Drops identity views, identity dtype casts, full slices and identity permutes; view(view(x))
    becomes view(x).

    Before::

        a = aten.view(x, [8, 64])          # x is already [8, 64]
        b = prims.convert_element_type(a, torch.float32)   # a is already fp32
        c = aten.view(aten.view(b, [512]), [2, 256])

    After::

        c = aten.view(x, [2, 256])
    """

    name = "noop_elimination"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or not node.args:
                continue
            source = node.args[0]
            if not isinstance(source, fx.Node):
                continue
            if self._is_identity(node, source):
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                rewrites += 1
            elif is_op(node, *_VIEWS) and is_op(source, *_VIEWS):
                node.update_arg(0, source.args[0])
                if not source.users:
                    graph.erase_node(source)
                rewrites += 1
        return rewrites

    @staticmethod
    def _is_identity(node: fx.Node, source: fx.Node) -> bool:
        out, inp = node_value(node), node_value(source)
        if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
            return False
        same_shape = _known_equal(out.shape, inp.shape) and _known_equal(out.stride(), inp.stride())
        if is_op(node, *_VIEWS, aten.alias.default, aten.expand.default):
            return same_shape and out.dtype == inp.dtype
        if is_op(node, prims.convert_element_type.default):
            return out.dtype == inp.dtype and same_shape
        if is_op(node, aten.slice.Tensor):
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else None
            return (same_shape and start in (None, 0) and inp.dim() > 0
                    and _known_equal(out.shape[dim], inp.shape[dim]))
        if is_op(node, aten.permute.default):
            return list(node.args[1]) == list(range(inp.dim()))
        return False


def _known_equal(a, b) -> bool:
    """Sizes (or size tuples) equal for every value of their symbols; adds no shape guard (one
    such as ``Eq(s0, 16)`` would specialize a dynamic token count to its example value)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_known_equal(x, y) for x, y in zip(a, b))
    return statically_known_true(sym_eq(a, b))
