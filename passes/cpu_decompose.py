"""Custom ops whose CPU implementation is their plain-torch chain, spelled out as that chain on CPU.

On the CPU an op such as ``infer.rotary_embedding`` has no kernel of its own: it runs its
reference chain op by op (tens of microseconds of dispatch per call, per layer, per step). Spelled
out in the graph as the same ATen ops, the inner compiler sees them: Inductor fuses them into its
own C++ loop with their neighbours. Same function (the same ops the op's CPU implementation runs);
nodes on other devices, where the op has a kernel, are left alone.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .base import InferPass, is_op
from .patterns import aten

infer = torch.ops.infer


class CpuDecomposePass(InferPass):
    """Before (q, k on the CPU)::

        r = infer.rotary_embedding(q, k, cos, sin); q2 = r[0]; k2 = r[1]

    After: ``q2`` and ``k2`` are ``rotary_ref(q, cos, sin)`` and ``rotary_ref(k, cos, sin)``
    (:func:`infer.runtime.ops.rotary.rotary_ref`) in ATen ops.
    """

    name = "cpu_decompose"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if not is_op(node, infer.rotary_embedding.default):
                continue
            q, k, cos, sin = node.args
            if any(_device(a) != "cpu" for a in (q, k, cos, sin)):
                continue
            users = list(node.users)
            if not all(u.target is operator.getitem for u in users):
                continue
            modes = {getattr(a.meta.get("val"), "fake_mode", None) for a in (q, k, cos, sin)}
            if len(modes) != 1:  # values traced apart (not one compile): no values for the new nodes
                self.context.near_miss(self.name, node, "its inputs' values come from different fake modes")
                continue
            with graph.inserting_before(node):
                outs = [_rotary(graph, x, cos, sin) for x in (q, k)]
            for user in users:
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
            self.context.count_fusion("rotary spelled out (cpu)")
            rewrites += 1
        return rewrites


def _device(node) -> str | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.device.type if isinstance(val, torch.Tensor) else None


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """``target(*args)`` as a node, its value computed from the arguments' values (fake tensors)."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
    return node


def _rotary(graph: fx.Graph, x: fx.Node, cos: fx.Node, sin: fx.Node) -> fx.Node:
    """``rotary_ref(x, cos, sin)``, op for op."""
    xv = x.meta["val"]
    half = cos.meta["val"].shape[-1]
    c = _call(graph, aten.unsqueeze.default, cos, 1)
    s = _call(graph, aten.unsqueeze.default, sin, 1)
    if cos.meta["val"].dtype != xv.dtype:
        c = _call(graph, torch.ops.prims.convert_element_type.default, c, xv.dtype)
        s = _call(graph, torch.ops.prims.convert_element_type.default, s, xv.dtype)
    x1 = _call(graph, aten.slice.Tensor, x, -1, 0, half)
    x2 = _call(graph, aten.slice.Tensor, x, -1, half, 2 * half)
    first = _call(graph, aten.sub.Tensor, _call(graph, aten.mul.Tensor, x1, c), _call(graph, aten.mul.Tensor, x2, s))
    second = _call(graph, aten.add.Tensor, _call(graph, aten.mul.Tensor, x2, c), _call(graph, aten.mul.Tensor, x1, s))
    rotated = _call(graph, aten.cat.default, [first, second], -1)
    if 2 * half == xv.shape[-1]:
        return rotated
    rest = _call(graph, aten.slice.Tensor, x, -1, 2 * half, xv.shape[-1])
    return _call(graph, aten.cat.default, [rotated, rest], -1)
