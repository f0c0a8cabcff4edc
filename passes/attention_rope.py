"""Moves the q/k norm + rotary into the paged-attention call that reads them."""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
from ..runtime.attention import op as _attention_op  # noqa: F401  (registers torch.ops.infer.paged_attention)
from .base import InferPass, is_op, node_value
from .patterns import aten

infer = torch.ops.infer
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class AttentionRopePass(InferPass):
    """Runs after ``qk_norm_rotary`` and ``defunctionalize`` (the attention call is direct).

    Before::

        r = infer.qk_norm_rotary(q, qw, q_eps, q_cast, q_dtype, k, kw, k_eps, k_cast, k_dtype, cos, sin)
        out = infer.paged_attention(view(r[0], [T, Hq*D]), view(r[1], [T, Hk*D]), v, cache, scale)

    After::

        out = infer.paged_attention(view(q, [T, Hq*D]), view(k, [T, Hk*D]), v, cache, scale,
                                    cos, sin, True, qw, kw, q_eps, k_eps, q_cast, k_cast)

    (``infer.rotary_embedding(q, k, cos, sin)`` alike, with ``qk_norm=False``.) The op then norms
    and rotates q and the new k inside the small-batch decode kernel, a launch less per layer, and
    calls the same op as before on every other path. Left alone: outputs with another user, norms
    whose out dtype is not their input's (the kernel writes the cache's dtype), and an attention
    call that already has these arguments.
    """

    name = "attention_rope"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if is_op(node, infer.paged_attention.default) and self._rewrite(graph, node):
                rewrites += 1
        return rewrites

    def _rewrite(self, graph: fx.Graph, attn: fx.Node) -> bool:
        if len(attn.args) != 5 or attn.kwargs:
            return False
        views = attn.args[:2]
        if not all(is_op(v, *_VIEWS) and len(v.users) == 1 for v in views):
            return False
        items = [v.args[0] for v in views]
        if not all(is_op(i, operator.getitem) and len(i.users) == 1 for i in items) or [i.args[1] for i in items] != [0, 1]:
            return False
        rot = items[0].args[0]
        if items[1].args[0] is not rot or len(rot.users) != 2:
            return False
        if is_op(rot, infer.qk_norm_rotary.default):
            q, qw, q_eps, q_cast, q_dtype, k, kw, k_eps, k_cast, k_dtype, cos, sin = rot.args
            q_val, k_val = node_value(q), node_value(k)
            if q_val is None or k_val is None or (q_dtype, k_dtype) != (q_val.dtype, k_val.dtype):
                self.context.near_miss(self.name, rot, "a q/k norm changes the dtype")
                return False
            extra = (cos, sin, True, qw, kw, q_eps, k_eps, q_cast, k_cast)
        elif is_op(rot, infer.rotary_embedding.default):
            q, k, cos, sin = rot.args
            extra = (cos, sin)
        else:
            return False
        with graph.inserting_before(attn):
            new_views = [graph.call_function(v.target, (raw, v.args[1])) for v, raw in zip(views, (q, k))]
        for new, old, raw in zip(new_views, views, (q, k)):
            new.meta["val"] = aten.view.default(node_value(raw), node_value(old).shape)
        attn.args = (*new_views, *attn.args[2:], *extra)
        for old in (*views, *items, rot):
            graph.erase_node(old)
        return True
