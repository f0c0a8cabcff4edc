"""Small structural helpers shared by the fusion passes (matching at the ATen level)."""
from __future__ import annotations

import numbers

import torch
from torch import fx

from .. import torch_internals as internals
from .base import is_op, node_value

aten = torch.ops.aten
prims = torch.ops.prims

ADDS = (aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar)
MULS = (aten.mul.Tensor, aten.mul_.Tensor)
CONVERT = prims.convert_element_type.default
VIEWS = (aten.view.default, aten._unsafe_view.default)


def tensor_val(node) -> torch.Tensor | None:
    val = node_value(node)
    return val if isinstance(val, torch.Tensor) else None


STRIDED_RESULT = "output is not contiguous (it keeps the layout of a strided input)"  # near-miss reason


def known_contiguous(val: torch.Tensor) -> bool:
    """Whether ``val`` is provably row-major contiguous (False when symbolic shapes leave it open).

    The fused ops return contiguous tensors, while eager elementwise chains keep their input's
    layout: a norm over a transposed view (Gemma 3's and EXAONE 4's q/k norms) gives a transposed
    result that later code may ``view`` as such. Replacing that chain would break the view."""
    return internals.is_contiguous_or_false(val)


def scalar_arg(node: fx.Node) -> tuple[fx.Node | None, float | None]:
    """For a binary op with one Python-number operand: (tensor operand, number)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if isinstance(b, numbers.Number) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(a, numbers.Number) and not isinstance(a, bool):
        return b, float(a)
    return None, None


def other_operand(node: fx.Node, known: fx.Node) -> fx.Node | None:
    """The operand of a binary op that is not `known` (None if `known` is not an operand)."""
    a, b = node.args[0], node.args[1]
    if a is known:
        return b if isinstance(b, fx.Node) else None
    if b is known:
        return a if isinstance(a, fx.Node) else None
    return None


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_cast(node, dtype: torch.dtype | None = None) -> bool:
    return is_op(node, CONVERT) and (dtype is None or node.args[1] == dtype)


def is_last_dim(dims, ndim: int) -> bool:
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, ndim - 1)


def is_square_of(node: fx.Node) -> fx.Node | None:
    """x for pow(x, 2) or mul(x, x)."""
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def replace_with(graph: fx.Graph, old: fx.Node, target, args: tuple, val=None) -> fx.Node:
    """Insert `target(*args)` just before `old`, give it `old`'s uses and metadata."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta["val"] = old.meta.get("val") if val is None else val
    old.replace_all_uses_with(new)
    return new
