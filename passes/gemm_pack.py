"""Horizontal GEMM fusion: linears that share an input become one GEMM on packed weights."""
from __future__ import annotations

import heapq
import re

import torch
from torch import fx

from .. import torch_internals as internals
from .base import InferPass, is_op
from .patterns import VIEWS, aten, node_order, replace_with, tensor_val


class GemmPackPass(InferPass):
    """Before (q/k/v projections of one normed input)::

        q = mm(x, permute(wq, [1, 0])); k = mm(x, permute(wk, [1, 0])); v = mm(x, permute(wv, [1, 0]))

    After::

        qkv = mm(x, permute(packed, [1, 0]))          # packed = cat([wq, wk, wv]) once, at compile time
        q = slice(qkv, 1, 0, Nq); k = slice(qkv, 1, Nq, Nq + Nk); v = slice(qkv, 1, Nq + Nk, N)

    The module's parameters become views of the packed storage, so weight memory is not doubled
    and in-place weight updates (`load_state_dict`, `copy_`) reach the packed GEMM. `addmm` with
    biases packs the biases the same way. Only weights that are parameters or buffers of the
    compiled module, of one dtype and device, are packed; activations are left alone.

    The slices have the pack's row stride, not their own width: every node downstream whose
    layout follows (views, transposes, elementwise ops) gets its value again for the new strides,
    and a ``view`` that is no longer valid becomes a ``reshape`` (same values, copied where eager
    had a view). A group with a downstream node that cannot take the new layout is left alone, with
    the reason in ``near_misses``. The fusion is counted under the names of what was packed, e.g.
    ``pack(q,k,v)`` for ``q_proj``, ``k_proj``, ``v_proj``.
    """

    name = "gemm_pack"

    def __call__(self, graph: fx.Graph) -> int:
        groups: dict[tuple, list[fx.Node]] = {}
        for node in graph.nodes:
            key = self._group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        rewrites, packed = 0, set()
        for members in groups.values():
            weights = {m.args[-1].args[0] for m in members}
            if len(members) < 2:
                continue
            if weights & packed:  # a weight can be a view of one packed tensor only
                self.context.near_miss(self.name, members[0], "a weight is already packed with another input")
                continue
            if self._pack(graph, members):
                packed |= weights
                rewrites += 1
        return rewrites

    def _group_key(self, node: fx.Node) -> tuple | None:
        """(input, has_bias, dtype, device, K) for mm/addmm with a packable weight, else None."""
        if is_op(node, aten.mm.default):
            bias, x, wt = None, *node.args
        elif is_op(node, aten.addmm.default) and not node.kwargs:
            bias, x, wt = node.args
        else:
            return None
        if not is_op(wt, aten.permute.default) or list(wt.args[1]) != [1, 0]:
            return None
        weight = self._static(wt.args[0])
        if weight is None or weight.dim() != 2:
            return None
        if bias is not None:
            b = self._static(bias)
            if b is None or b.shape != (weight.shape[0],) or b.dtype != weight.dtype:
                return None
        return (_canonical_input(x), bias is not None, weight.dtype, weight.device, weight.shape[1])

    def _static(self, node) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.context.static_inputs.get(node.name)
        return None

    def _pack(self, graph: fx.Graph, members: list[fx.Node]) -> bool:
        """Pack one group; False (a near miss) when a downstream node cannot take the new layout."""
        has_bias = is_op(members[0], aten.addmm.default)
        weight_nodes = [m.args[-1].args[0] for m in members]
        x_val = tensor_val(members[0].args[-2])
        widths = [tensor_val(m).shape[1] for m in members]
        fused_val = x_val.new_empty((x_val.shape[0], sum(widths)))
        bounds = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        slice_vals = [aten.slice.Tensor(fused_val, 1, a, b) for a, b in bounds]
        relaid = downstream_layouts(graph, dict(zip(members, slice_vals)))
        if isinstance(relaid, str):
            self.context.near_miss(self.name, members[0], relaid)
            return False
        new_vals, reshapes = relaid
        packed_w = self._packed_input(graph, weight_nodes, weight_nodes[0])
        x = members[0].args[-2]
        packed_b = None
        if has_bias:
            packed_b = self._packed_input(graph, [m.args[0] for m in members], weight_nodes[0])
        with graph.inserting_before(members[0]):
            transposed = graph.call_function(aten.permute.default, (packed_w, [1, 0]))
            if has_bias:
                fused = graph.call_function(aten.addmm.default, (packed_b, x, transposed))
            else:
                fused = graph.call_function(aten.mm.default, (x, transposed))
        transposed.meta["val"] = packed_w.meta["val"].t()
        fused.meta["val"] = fused_val
        for member, (start, end) in zip(members, bounds):
            out = replace_with(graph, member, aten.slice.Tensor, (fused, 1, start, end), val=new_vals.pop(member))
            new_vals[out] = out.meta["val"]
        for node, val in new_vals.items():
            node.meta["val"] = val
        for node in reshapes:
            node.target = aten.reshape.default
        self.context.count_fusion(pack_label([self.context.input_name(n.name) for n in weight_nodes]))
        return True

    def _packed_input(self, graph: fx.Graph, nodes: list[fx.Node], like: fx.Node) -> fx.Node:
        packed = pack_in_place([self._static(n) for n in nodes])
        return self.context.add_input(graph, packed, tensor_val(like), recipe=("pack", tuple(n.name for n in nodes)))


def pack_label(names: list[str]) -> str:
    """``pack(q,k,v)`` for ``…q_proj.weight``, ``…k_proj.weight``, ``…v_proj.weight``: the names'
    words (split at ``.`` and ``_``) less those every name starts or ends with."""
    words = [re.split(r"[._]", n) for n in names]
    head = 0
    while all(len(w) > head + 1 and w[head] == words[0][head] for w in words):
        head += 1
    tail = 0
    while all(len(w) > head + tail + 1 and w[-1 - tail] == words[0][-1 - tail] for w in words):
        tail += 1
    return "pack(" + ",".join("_".join(w[head:len(w) - tail]) for w in words) + ")"


def downstream_layouts(graph: fx.Graph, changed: dict[fx.Node, torch.Tensor]
                       ) -> tuple[dict[fx.Node, object], set[fx.Node]] | str:
    """The values of the nodes downstream of ``changed`` (node -> its value with a new layout)
    computed again on their fake inputs, in graph order, as far as a layout keeps changing; and
    the views among them that the new strides make invalid (to become reshapes). A string says
    why a node cannot take its new inputs. The graph is not changed."""
    order = node_order(graph)
    new: dict[fx.Node, object] = dict(changed)
    reshapes: set[fx.Node] = set()
    pending = [(order[u], u) for n in changed for u in n.users]
    heapq.heapify(pending)
    while pending:
        _, node = heapq.heappop(pending)
        if node in new or node.op != "call_function":
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: new.get(a, a.meta.get("val")))
        try:
            val = node.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the op on its new inputs is a reason
            if not is_op(node, *VIEWS):
                return f"{node.name} ({node.target}) cannot take the packed layout: {type(e).__name__}"
            try:
                val = aten.reshape.default(*args, **kwargs)
            except Exception as e2:  # noqa: BLE001
                return f"{node.name}: neither a view nor a reshape of the packed layout ({type(e2).__name__})"
            reshapes.add(node)
        if _same_layout(val, node.meta.get("val")):
            continue  # what follows sees what it saw before
        new[node] = val
        for user in node.users:
            heapq.heappush(pending, (order[user], user))
    return new, reshapes


def _same_layout(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)
    expr = lambda sizes: [s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes]  # noqa: E731
    return (a.dtype == b.dtype and expr(a.shape) == expr(b.shape) and expr(a.stride()) == expr(b.stride())
            and expr([a.storage_offset()]) == expr([b.storage_offset()]))


def _canonical_input(x):
    """Equal views of one tensor (Dynamo traces one `view` per linear) are one input."""
    if is_op(x, *VIEWS):
        return (x.args[0], tuple(x.args[1]))
    return x


def pack_in_place(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding `tensors` stacked along dim 0, with each original turned into a view of it.

    If they already are consecutive views of one storage (packed before), that storage is reused.
    The pack is an ordinary tensor even under inference mode: the weights keep the dispatch keys
    Dynamo guarded on, so a graph compiled for one layer still matches the next layer's weights.
    """
    with internals.unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():
        return _pack(tensors)


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    rows = sum(t.shape[0] for t in tensors)
    shape = (rows,) + tuple(tensors[0].shape[1:])
    if _consecutive_views(tensors):
        first = tensors[0]
        return first.as_strided(shape, torch.empty(shape, device="meta").stride(), first.storage_offset())
    packed = torch.cat([t.detach() for t in tensors], dim=0)
    start = 0
    for t in tensors:
        t.data = packed[start:start + t.shape[0]]
        start += t.shape[0]
    return packed


def _consecutive_views(tensors: list[torch.Tensor]) -> bool:
    storage = tensors[0].untyped_storage().data_ptr()
    offset = tensors[0].storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True
