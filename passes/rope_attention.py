"""Folds the rotary embedding (with or without the q/k norms) into the paged attention that reads it."""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..runtime.attention import rope_op  # noqa: F401  (registers torch.ops.infer.rope_paged_attention)
from .base import InferPass, is_op
from .patterns import tensor_val

infer = torch.ops.infer
aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class RopeAttentionPass(InferPass):
    """Runs after defunctionalize (the attention call is in place by then).

    Before::

        r = infer.qk_norm_rotary(q, qw, q_eps, q_cast, q_dt, k, kw, k_eps, k_cast, k_dt, cos, sin)
        #   or infer.rotary_embedding(q, k, cos, sin)
        qf = aten.view(getitem(r, 0), [T, Hq*D]);  kf = aten.view(getitem(r, 1), [T, Hkv*D])
        out = infer.paged_attention(qf, kf, v, kv_cache, scale)

    After::

        out = infer.rope_paged_attention(q, k, v, kv_cache, scale, cos, sin, True, qw, q_eps, q_cast, q_dt,
                                         kw, k_eps, k_cast, k_dt)

    A decode step then norms and rotates q/k inside the attention kernel (one launch fewer per
    layer). Left alone: a rotated q or k with any other user, q and k from different rotaries,
    and a view that is not the ``[T, H, D] -> [T, H*D]`` flatten.
    """

    name = "rope_attention"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if not is_op(node, infer.paged_attention.default):
                continue
            rotary = self._rotary(node)
            if rotary is None:
                continue
            self._rewrite(graph, node, rotary)
            rewrites += 1
        return rewrites

    def _rotary(self, attn: fx.Node) -> fx.Node | None:
        q_flat, k_flat = attn.args[:2]
        parts = [self._flattened_output(x) for x in (q_flat, k_flat)]
        if any(p is None for p in parts):
            return None
        (q_item, q_index), (k_item, k_index) = parts
        rotary = q_item.args[0]
        if (q_index, k_index) != (0, 1) or k_item.args[0] is not rotary:
            self.context.near_miss(self.name, attn, "q and k come from different rotaries")
            return None
        if not is_op(rotary, infer.qk_norm_rotary.default, infer.rotary_embedding.default):
            return None
        if set(rotary.users) != {q_item, k_item}:
            self.context.near_miss(self.name, attn, "the rotary's outputs have other users")
            return None
        return rotary

    def _flattened_output(self, view: fx.Node) -> tuple[fx.Node, int] | None:
        """``(getitem node, index)`` when ``view`` flattens ``getitem(rotary, i)`` and is its only use."""
        if not is_op(view, *_VIEWS) or len(view.users) != 1:
            return None
        item = view.args[0]
        if not (isinstance(item, fx.Node) and item.op == "call_function" and item.target is operator.getitem
                and len(item.users) == 1):
            return None
        src, dst = tensor_val(item), tensor_val(view)
        if src is None or dst is None or src.dim() != 3 or dst.dim() != 2 or dst.shape[1] != src.shape[1] * src.shape[2]:
            return None
        return item, item.args[1]

    def _rewrite(self, graph: fx.Graph, attn: fx.Node, rotary: fx.Node) -> None:
        _, _, v, kv_cache, scale = attn.args
        if is_op(rotary, infer.qk_norm_rotary.default):
            q, qw, q_eps, q_cast, q_dt, k, kw, k_eps, k_cast, k_dt, cos, sin = rotary.args
            args = (q, k, v, kv_cache, scale, cos, sin, True, qw, q_eps, q_cast, q_dt, kw, k_eps, k_cast, k_dt)
        else:
            q, k, cos, sin = rotary.args
            dtype = tensor_val(q).dtype
            args = (q, k, v, kv_cache, scale, cos, sin, False, None, 0.0, False, dtype, None, 0.0, False, dtype)
        with graph.inserting_before(attn):
            fused = graph.call_function(infer.rope_paged_attention.default, args)
        fused.meta["val"] = attn.meta.get("val")
        attn.replace_all_uses_with(fused)
        graph.erase_node(attn)  # the rotary, getitems and views are dead now: the manager drops them
