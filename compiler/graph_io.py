"""An ATen FX graph to and from plain JSON-able data, fake values (symbolic shapes) included.

Only what a transformed inference graph holds is supported: placeholders, `call_function` nodes
on `OpOverload`s and on functions of `operator`, `math` and `torch` (the `sym_*` helpers), and
one output; arguments made of nodes, numbers, strings, dtypes, devices, layouts, memory formats,
lists and tuples. Anything else raises `Unsupported`, so that a graph is saved exactly or not
at all. Each node's `meta["val"]` (fake tensor, SymInt/SymBool/SymFloat, number, or a tuple of
them) is saved as dtype/device/shape/stride with sizes as sympy expressions, and rebuilt on load
under a new `FakeTensorMode` whose `ShapeEnv` holds one unbacked, size-like symbol per symbol saved.
"""
from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable, Iterable

import sympy
import torch
from torch import fx

from .. import torch_internals as internals

FUNCTION_MODULES = ("operator", "math", "torch")


class Unsupported(ValueError):
    """The graph holds something this format cannot save exactly."""


def dump_graph(graph: fx.Graph) -> list[dict]:
    """One dict per node, in graph order."""
    return [{"name": n.name, "op": n.op, "target": _dump_target(n), "args": _dump_arg(n.args),
             "kwargs": _dump_arg(n.kwargs), "val": _dump_val(n.meta.get("val"))} for n in graph.nodes]


def load_graph(nodes: list[dict], values: Callable[[fx.Graph], Iterable[fx.Node]] | None = None) -> fx.Graph:
    """The graph `dump_graph` saved, with `meta["val"]` rebuilt for the nodes `values(graph)` names
    (all nodes when None). Rebuilding costs a fake tensor per node: skip the ones nobody reads."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in nodes:
        args, kwargs = _load_arg(spec["args"], env), _load_arg(spec["kwargs"], env)
        if spec["op"] == "placeholder":
            node = graph.placeholder(spec["name"])
        elif spec["op"] == "output":
            node = graph.output(args[0])
        elif spec["op"] == "call_function":
            node = graph.create_node("call_function", _load_target(spec["target"]), args, kwargs, spec["name"])
        else:
            raise Unsupported(f"node {spec['name']}: op {spec['op']!r}")
        if node.name != spec["name"]:
            raise Unsupported(f"node name {spec['name']!r} came back as {node.name!r}")
        env[node.name] = node
    vals, specs = _ValueBuilder(), {spec["name"]: spec["val"] for spec in nodes}
    for node in graph.nodes if values is None else values(graph):
        node.meta["val"] = vals.build(specs[node.name])
    return graph


def _dump_target(node: fx.Node) -> dict | str | None:
    if node.op in ("placeholder", "output"):
        return None
    target = node.target
    if node.op != "call_function":
        raise Unsupported(f"node {node.name}: op {node.op!r}")
    if internals.is_op_overload(target):
        return {"op": target._schema.name, "overload": target._overloadname}
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    module = "operator" if module == "_operator" else module
    if module in FUNCTION_MODULES and name and _load_target({"fn": f"{module}.{name}"}) is target:
        return {"fn": f"{module}.{name}"}
    raise Unsupported(f"node {node.name}: target {target!r}")


def _load_target(spec: dict) -> Any:
    if "op" in spec:
        namespace, name = spec["op"].split("::")
        return getattr(getattr(getattr(torch.ops, namespace), name), spec["overload"])
    module, _, name = spec["fn"].rpartition(".")
    return getattr(importlib.import_module(module), name)


_SIMPLE = {torch.dtype: "dtype", torch.device: "device", torch.layout: "layout", torch.memory_format: "memory_format"}


def _dump_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_dump_arg(x) for x in a]}
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise Unsupported(f"dict argument with non-string keys: {a!r}")
        return {"dict": {k: _dump_arg(v) for k, v in a.items()}}
    kind = _SIMPLE.get(type(a))
    if kind is not None:
        return {kind: str(a).removeprefix("torch.")}
    raise Unsupported(f"argument {a!r} of type {type(a).__name__}")


def _load_arg(a: Any, env: dict[str, fx.Node]) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, value), = a.items()
    if kind == "node":
        return env[value]
    if kind in ("list", "tuple"):
        items = [_load_arg(x, env) for x in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _load_arg(v, env) for k, v in value.items()}
    if kind == "device":
        return torch.device(value)
    return getattr(torch, value)  # dtype, layout, memory format


def _dump_val(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, torch.Tensor):
        if v.layout != torch.strided:
            raise Unsupported(f"value of layout {v.layout}")
        return {"tensor": {"dtype": str(v.dtype).removeprefix("torch."), "device": str(v.device),
                           "shape": [_dump_sym(s) for s in v.shape], "stride": [_dump_sym(s) for s in v.stride()],
                           "offset": _dump_sym(v.storage_offset())}}
    if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return {type(v).__name__: sympy.srepr(v.node.expr)}
    if isinstance(v, (list, tuple)):
        return {"tuple": [_dump_val(x) for x in v]}
    raise Unsupported(f"node value of type {type(v).__name__}")


def _dump_sym(s: Any) -> int | str:
    return int(s) if isinstance(s, numbers.Integral) else sympy.srepr(s.node.expr)


class _ValueBuilder:
    """Rebuilds saved values under one new fake mode, mapping each saved symbol to a fresh one."""

    def __init__(self) -> None:
        self.mode, self.shape_env = internals.new_fake_mode()
        self.symbols: dict[str, sympy.Symbol] = {}
        self.names = _sympy_names()
        self.exprs: dict[str, sympy.Expr] = {}  # one parse (and one SymInt) per distinct expression
        self.symints: dict[str, Any] = {}

    def build(self, spec: Any) -> Any:
        if not isinstance(spec, dict):
            return spec
        (kind, value), = spec.items()
        if kind == "tuple":
            return tuple(self.build(x) for x in value)
        if kind == "tensor":
            return self._tensor(value)
        if kind == "SymInt":
            return self._sym(value)
        if kind == "SymBool":
            return self.shape_env.create_symboolnode(self._expr(value))
        return self.shape_env.create_symfloatnode(self._expr(value), hint=None)

    def _tensor(self, value: dict) -> torch.Tensor:
        """A meta tensor of the saved layout, made fake on the saved device (no fake dispatch)."""
        shape = [self._sym(s) for s in value["shape"]]
        stride = [self._sym(s) for s in value["stride"]]
        meta = torch.empty_strided(shape, stride, dtype=getattr(torch, value["dtype"]), device="meta")
        offset = self._sym(value["offset"])
        if offset != 0:
            meta = meta.as_strided(shape, stride, offset)
        return self.mode.fake_tensor_converter.from_meta_and_device(self.mode, meta, torch.device(value["device"]))

    def _sym(self, s: int | str) -> Any:
        if isinstance(s, int):
            return s
        if s not in self.symints:
            expr = self._expr(s)
            self.symints[s] = int(expr) if expr.is_Integer else self.shape_env.create_symintnode(expr, hint=None)
        return self.symints[s]

    def _expr(self, text: str) -> sympy.Expr:
        if text not in self.exprs:
            expr = sympy.sympify(text, locals=self.names)
            self.exprs[text] = expr.xreplace({s: self._symbol(s.name) for s in expr.free_symbols})
        return self.exprs[text]

    def _symbol(self, name: str) -> sympy.Symbol:
        if name not in self.symbols:
            from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size
            with self.shape_env.ignore_fresh_unbacked_symbols():  # bound by the graph's inputs, not an op
                fresh = self.shape_env.create_unbacked_symint()
            _constrain_range_for_size(fresh)
            self.symbols[name] = fresh.node.expr
        return self.symbols[name]


def _sympy_names() -> dict[str, Any]:
    """The names `sympy.srepr` writes for torch's own sympy functions (they shadow sympy's)."""
    import torch.utils._sympy.functions as functions
    names = {n: getattr(functions, n) for n in dir(functions)
             if isinstance(getattr(functions, n), type) and issubclass(getattr(functions, n), sympy.Basic)}
    names["Symbol"] = sympy.Symbol
    return names
