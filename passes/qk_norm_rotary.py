"""Fuses the per-head q/k RMSNorms (Qwen3) into the rotary embedding that reads them."""
from __future__ import annotations

import torch
from torch import fx

from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
from .base import InferPass, is_op
from .patterns import VIEWS, aten

infer = torch.ops.infer
_VIEWS = VIEWS + (aten.reshape.default,)


class QKNormRotaryPass(InferPass):
    """Runs after the RMSNorm pass, which turns the q/k norms into ``infer.rms_norm``.

    Before::

        qn = infer.rms_norm(q, qw, q_eps, q_cast, q_dtype)       # q: [T, Hq, D], norm over D
        kn = infer.rms_norm(k, kw, k_eps, k_cast, k_dtype)       # k: [T, Hk, D]
        r = infer.rotary_embedding(qn, kn, cos, sin)             # -> (q_out, k_out)

    After::

        r = infer.qk_norm_rotary(q, qw, q_eps, q_cast, q_dtype, k, kw, k_eps, k_cast, k_dtype, cos, sin)

    Each norm keeps its own arguments. Left alone: a rotary without a norm on both inputs
    (Llama), a norm with any other user (its output is needed anyway), one norm feeding both
    inputs, and a view between norm and rotary (a norm over ``[T, Hq*D]`` viewed as heads is not
    a per-head norm; the models never put one there otherwise).
    """

    name = "qk_norm_rotary"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if is_op(node, infer.rotary_embedding.default) and self._fusable(node):
                q_norm, k_norm, cos, sin = node.args
                with graph.inserting_before(node):
                    fused = graph.call_function(infer.qk_norm_rotary.default, (*q_norm.args, *k_norm.args, cos, sin))
                fused.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(fused)
                for old in (node, q_norm, k_norm):
                    graph.erase_node(old)
                rewrites += 1
        return rewrites

    def _fusable(self, rotary: fx.Node) -> bool:
        miss = lambda reason: self.context.near_miss(self.name, rotary, reason)  # noqa: E731
        q, k = rotary.args[:2]
        if q is k:
            return False
        for name, norm in (("q", q), ("k", k)):
            if is_op(norm, *_VIEWS) and is_op(norm.args[0], infer.rms_norm.default):
                miss(f"a view sits between the {name} norm and the rotary")
                return False
            if not is_op(norm, infer.rms_norm.default):
                return False
            if len(norm.users) != 1:
                miss(f"the {name} norm has other users")
                return False
            if len(norm.args) != 5 or norm.kwargs:
                miss(f"the {name} norm's arguments are not positional")
                return False
        return True
