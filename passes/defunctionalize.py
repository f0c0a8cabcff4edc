"""Turns functionalized calls of `infer` ops that mutate an input back into in-place calls."""
from __future__ import annotations

import operator

import torch
from torch import fx

from .base import InferPass
from .patterns import aten

_HOPS = tuple(getattr(torch.ops.higher_order, name) for name in ("auto_functionalized", "auto_functionalized_v2")
              if hasattr(torch.ops.higher_order, name))


class DefunctionalizePass(InferPass):
    """AOT functionalizes a mutating op (the paged-attention cache write) into a copy-and-return
    form; left that way the whole KV cache would be copied every step.

    Before::

        af = auto_functionalized_v2(infer.paged_attention, q=q, ..., _all_bases=[kv_cache])
        out = af[0]; new_cache = af[1]
        copy_(kv_cache, new_cache)

    After::

        out = infer.paged_attention(q, k, v, kv_cache, scale)    # writes kv_cache in place
    """

    name = "defunctionalize"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in _HOPS and self._rewrite(graph, node):
                rewrites += 1
        return rewrites

    def _rewrite(self, graph: fx.Graph, node: fx.Node) -> bool:
        op = node.args[0]
        if getattr(op, "namespace", None) != "infer":
            return False
        kwargs = dict(node.kwargs)
        schema_args = [a.name for a in op._schema.arguments]
        bases = kwargs.pop("_all_bases", None)
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        for name in mutated:
            if bases is not None:
                if any(f"_{name}_{suffix}" in kwargs for suffix in ("size", "stride", "storage_offset")):
                    self.context.near_miss(self.name, node, f"{name} is a view of its base")
                    return False
                kwargs[name] = bases[kwargs.pop(f"_{name}_base_index")]
        call_args = tuple(kwargs[a] for a in schema_args)
        with graph.inserting_before(node):
            call = graph.call_function(op, call_args)
        result_val = node.meta.get("val")
        call.meta["val"] = result_val[0] if isinstance(result_val, (tuple, list)) else result_val
        for user in list(node.users):
            index = user.args[1] if user.target is operator.getitem else None
            if index == 0:
                user.replace_all_uses_with(call)
            elif index is not None:
                self._drop_copy_back(graph, user, call_args[schema_args.index(mutated[index - 1])])
            graph.erase_node(user) if not user.users else None
        graph.erase_node(node)
        return True

    @staticmethod
    def _drop_copy_back(graph: fx.Graph, new_base: fx.Node, base: fx.Node) -> None:
        for user in list(new_base.users):
            if user.target is aten.copy_.default and user.args[0] is base and user.args[1] is new_base:
                user.replace_all_uses_with(base)
                graph.erase_node(user)
        new_base.replace_all_uses_with(base)
