"""Fuses RMSNorm spelled out in ATen ops into `infer::rms_norm`."""
from __future__ import annotations

import torch
from torch import fx

from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
from .base import InferPass, is_op
from .patterns import (ADDS, CONVERT, MULS, STRIDED_RESULT, aten, is_cast, is_last_dim, is_square_of,
                       known_contiguous, only_user, other_operand, replace_with, scalar_arg, tensor_val)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _promotes_to_f32(node: fx.Node) -> bool:
    val = tensor_val(node)
    return val is not None and val.dtype == torch.float32


class RMSNormPass(InferPass):
    """Matches every common RMSNorm spelling, anchored at its `rsqrt`.

    Before (Hugging Face Llama/Qwen, bf16)::

        h = convert_element_type(x, f32); v = mean(pow(h, 2), [-1], True)
        y = mul(h, rsqrt(add(v, eps)));   out = mul(w, convert_element_type(y, bf16))

    After::

        out = infer.rms_norm(x, w, eps, cast_before_weight=True, out_dtype=bf16)

    Also: no casts (fp32), weight applied before the final cast (`F.rms_norm`, Gemma's `1 + w`
    computed in fp32), the uncast input times the fp32 rsqrt (T5: promoted to fp32), no weight, and per-head q/k norms over the last dim of a reshaped tensor.
    Left alone: a variance, rsqrt or normalized intermediate used outside the norm, a reduction
    over another dim, a weight that broadcasts over anything but the last dim, or a result that
    is not contiguous (a norm over a transposed view keeps its input's layout in eager, and later
    views may rely on it; the op returns a contiguous tensor).
    """

    name = "rms_norm"

    def __call__(self, graph: fx.Graph) -> int:
        rewrites = 0
        for node in list(graph.nodes):
            if is_op(node, aten.rsqrt.default):
                match = self._match(node)
                if match is not None:
                    end, args = match
                    replace_with(graph, end, torch.ops.infer.rms_norm.default, args)
                    rewrites += 1
        return rewrites

    def _match(self, rsqrt: fx.Node):
        miss = lambda reason: self.context.near_miss(self.name, rsqrt, reason)  # noqa: E731
        add = rsqrt.args[0]
        if not is_op(add, *ADDS) or len(add.users) != 1:
            return None
        mean, eps = scalar_arg(add)
        if not is_op(mean, aten.mean.dim) or len(mean.users) != 1 or eps is None:
            return None
        h = is_square_of(mean.args[0])
        h_val = tensor_val(h)
        if h is None or h_val is None or len(mean.args[0].users) != 1:
            return None
        if not (len(mean.args) > 2 and mean.args[2]) or not is_last_dim(mean.args[1], h_val.dim()):
            return miss("mean is not over the last dim with keepdim=True")
        y = only_user(rsqrt)
        if y is None or not is_op(y, *MULS):
            return miss("rsqrt is used outside the norm")
        x = h.args[0] if is_cast(h, torch.float32) else h
        scaled = other_operand(y, rsqrt)
        # T5 multiplies the bf16/fp16 input itself by the fp32 rsqrt: type promotion upcasts it
        # exactly, so the product is the one of the upcast input
        if scaled is not h and not (scaled is x and x is not h and _promotes_to_f32(y)):
            return miss("rsqrt multiplies a value other than the norm's input")
        x_val = tensor_val(x)
        if h_val.dtype != torch.float32 or x_val is None or x_val.dtype not in _FLOATS:
            return miss(f"norm computed in {h_val.dtype}, input {None if x_val is None else x_val.dtype}")
        return self._match_tail(y, x, x_val, eps, miss)

    def _match_tail(self, y: fx.Node, x: fx.Node, x_val: torch.Tensor, eps: float, miss):
        hidden = x_val.shape[-1]
        end, weight, cast_before_weight = y, None, False
        user = only_user(y)
        if len(y.users) > 1:
            return miss("normalized value used outside the norm")
        if user is not None and is_cast(user):
            if user.args[1] != x_val.dtype:
                return miss(f"normalized value cast to {user.args[1]}, input is {x_val.dtype}")
            end = user
            mul = only_user(user)
            if mul is not None and is_op(mul, *MULS):
                weight = self._weight(mul, user, hidden)
                if weight is not None:
                    end, cast_before_weight = mul, True
        elif user is not None and is_op(user, *MULS):
            weight = self._weight(user, y, hidden)
            if weight is not None:
                end = user
                cast = only_user(user)
                if cast is not None and is_cast(cast):
                    end = cast
        out_val = tensor_val(end)
        if out_val is None or out_val.shape != x_val.shape:
            return miss("output shape differs from the input's")
        if not known_contiguous(out_val):
            return miss(STRIDED_RESULT)
        return end, (x, weight, eps, cast_before_weight, out_val.dtype)

    @staticmethod
    def _weight(mul: fx.Node, operand: fx.Node, hidden: int) -> fx.Node | None:
        weight = other_operand(mul, operand)
        val = tensor_val(weight)
        if val is None or tuple(val.shape) != (hidden,) or val.dtype not in _FLOATS:
            return None
        return weight
