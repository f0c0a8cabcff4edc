"""Fuses `silu(a) * b` (in any spelling that decomposes to ATen) into `infer::silu_and_mul`."""
from __future__ import annotations

import torch
from torch import fx

from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
from .base import InferPass, is_op
from .patterns import (ADDS, MULS, STRIDED_RESULT, aten, is_cast, known_contiguous, only_user, other_operand,
                       replace_with, scalar_arg, tensor_val)


class SiluAndMulPass(InferPass):
    """Before (the decomposed `F.silu(gate) * up`, bf16)::

        g = convert_element_type(gate, f32)
        s = convert_element_type(div(g, add(exp(neg(g)), 1)), bf16)
        out = mul(s, up)

    After::

        out = infer.silu_and_mul(gate, up)

    Also `aten.silu`, `a * sigmoid(a)`, either operand order of the final multiply, and fp32 with no
    casts. When gate and up are slices of one packed GEMM output, the op reads them in place.
    Left alone: GELU and other activations, broadcasting multiplies, a silu value used elsewhere,
    and a result that is not contiguous (eager keeps a strided input's layout, which later views may
    rely on; the op returns a contiguous tensor).
    """

    name = "silu_and_mul"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if not is_op(node, *MULS):
                continue
            for s in node.args[:2]:
                gate = self._silu_input(s)
                up = other_operand(node, s) if gate is not None else None
                if up is None or len(s.users) != 1:
                    continue
                g_val, u_val, out_val = tensor_val(gate), tensor_val(up), tensor_val(node)
                if g_val is None or u_val is None or g_val.shape != u_val.shape or out_val.shape != g_val.shape:
                    self.context.near_miss(self.name, node, "gate and up shapes differ (broadcast)")
                    break
                if not known_contiguous(out_val):
                    self.context.near_miss(self.name, node, STRIDED_RESULT)
                    break
                replace_with(graph, node, torch.ops.infer.silu_and_mul.default, (gate, up))
                rewrites += 1
                break
        return rewrites

    def _silu_input(self, s) -> fx.Node | None:
        """`a` when `s` computes silu(a) rounded to a's dtype, else None."""
        if is_op(s, aten.silu.default):
            return s.args[0]
        core, out_dtype = (s.args[0], s.args[1]) if is_cast(s) else (s, None)
        h = self._silu_core(core)
        if h is None or not self._internal_only(core, h):
            return None
        a = h.args[0] if is_cast(h, torch.float32) else h
        a_val = tensor_val(a)
        if a_val is None:
            return None
        if out_dtype is None:
            return a if a is h else None
        return a if out_dtype == a_val.dtype and a is not h else None

    @staticmethod
    def _silu_core(core) -> fx.Node | None:
        """h for div(h, add(exp(neg(h)), 1)) or mul(h, sigmoid(h))."""
        if is_op(core, aten.div.Tensor):
            h, denom = core.args
            if is_op(denom, *ADDS):
                e, one = scalar_arg(denom)
                if one == 1.0 and is_op(e, aten.exp.default) and is_op(e.args[0], aten.neg.default) \
                        and e.args[0].args[0] is h:
                    return h
        if is_op(core, *MULS):
            for sig in core.args[:2]:
                if is_op(sig, aten.sigmoid.default) and other_operand(core, sig) is sig.args[0]:
                    return sig.args[0]
        return None

    @staticmethod
    def _internal_only(core: fx.Node, h: fx.Node) -> bool:
        """The silu's own intermediates feed nothing else."""
        stack, seen = [core], set()
        while stack:
            n = stack.pop()
            if n is h or n in seen:
                continue
            seen.add(n)
            if n is not core and only_user(n) is None:
                return False
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
        return True
