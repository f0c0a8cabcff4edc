"""Horizontal GEMM fusion: linears that share an input become one GEMM on packed weights."""
from __future__ import annotations

import torch
from torch import fx

from .base import InferPass, is_op
from .patterns import aten, replace_with, tensor_val

_VIEWS = (aten.view.default, aten._unsafe_view.default)


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
            packed |= weights
            self._pack(graph, members)
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

    def _pack(self, graph: fx.Graph, members: list[fx.Node]) -> None:
        has_bias = is_op(members[0], aten.addmm.default)
        weight_nodes = [m.args[-1].args[0] for m in members]
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
        x_val = tensor_val(members[0].args[-2])
        transposed.meta["val"] = packed_w.meta["val"].t()
        fused.meta["val"] = x_val.new_empty((x_val.shape[0], packed_w.meta["val"].shape[0]))
        start = 0
        for member in members:
            width = tensor_val(member).shape[1]
            out = replace_with(graph, member, aten.slice.Tensor, (fused, 1, start, start + width))
            out.meta["val"] = aten.slice.Tensor(fused.meta["val"], 1, start, start + width)  # the node's op
            for user in list(out.users):  # a view of a column slice may not exist: reshape instead
                if is_op(user, *_VIEWS):
                    user.target = aten.reshape.default
            start += width
        kind = "qkv" if len(members) == 3 else "gate_up" if len(members) == 2 else "gemm_pack"
        self.context.report.count_fusion(kind)

    def _packed_input(self, graph: fx.Graph, nodes: list[fx.Node], like: fx.Node) -> fx.Node:
        packed = pack_in_place([self._static(n) for n in nodes])
        return self.context.add_input(graph, packed, tensor_val(like), recipe=("pack", tuple(n.name for n in nodes)))


def _canonical_input(x):
    """Equal views of one tensor (Dynamo traces one `view` per linear) are one input."""
    if is_op(x, *_VIEWS):
        return (x.args[0], tuple(x.args[1]))
    return x


def pack_in_place(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding `tensors` stacked along dim 0, with each original turned into a view of it.

    If they already are consecutive views of one storage (packed before), that storage is reused.
    The pack is an ordinary tensor even under inference mode: the weights keep the dispatch keys
    Dynamo guarded on, so a graph compiled for one layer still matches the next layer's weights.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():
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
