"""What every pass shares: the compile-time context and the pass interface."""
from __future__ import annotations

import abc
import hashlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import fx


@dataclass(slots=True)
class PassContext:
    """What a pass may know beyond the graph.

    `static_inputs` maps a placeholder's name to the real tensor behind it when that input is a
    parameter or buffer of the compiled module (weights a pass may repack); activations are absent.
    Tensors a pass creates (packed weights) become new trailing graph inputs, `extra_inputs`,
    which the compiled callable appends to every call. `extra_recipes` says, per extra input,
    how to make it again from the graph's own inputs (for the compile cache): ``("pack", names)``
    is `gemm_pack.pack_in_place` of the tensors behind those placeholders; None: it cannot be.
    `input_names` maps a placeholder's name to the module path of the weight behind it
    (``layers.0.self_attn.q_proj.weight``), where the caller knows it. What the passes did is
    counted here (`fusions`, `near_misses`); the compiler copies it into its report.
    """

    static_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    input_names: dict[str, str] = field(default_factory=dict)
    fusions: dict[str, int] = field(default_factory=dict)  # fusion kind -> sites fused
    near_misses: list[str] = field(default_factory=list)  # sites that looked close, with the reason
    extra_inputs: list[torch.Tensor] = field(default_factory=list)
    extra_recipes: list[tuple[str, tuple[str, ...]] | None] = field(default_factory=list)

    def add_input(self, graph: fx.Graph, tensor: torch.Tensor, like: torch.Tensor | None = None,
                  recipe: tuple[str, tuple[str, ...]] | None = None) -> fx.Node:
        """A new placeholder fed with `tensor` at run time; its `val` is faked like `like`."""
        last = graph.find_nodes(op="placeholder")[-1]  # in graph order, without a walk of the graph
        with graph.inserting_after(last):
            node = graph.placeholder(f"infer_const_{len(self.extra_inputs)}")
        mode = getattr(like, "fake_mode", None)
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor
        self.extra_inputs.append(tensor)
        self.extra_recipes.append(recipe)
        self.static_inputs[node.name] = tensor
        return node

    def near_miss(self, pass_name: str, node: fx.Node, reason: str) -> None:
        self.near_misses.append(f"{pass_name}: {node.name}: {reason}")

    def count_fusion(self, kind: str, n: int = 1) -> None:
        self.fusions[kind] = self.fusions.get(kind, 0) + n

    def input_name(self, placeholder: str) -> str:
        """The module path behind a placeholder, else the placeholder's own name."""
        return self.input_names.get(placeholder, placeholder)


class InferPass(abc.ABC):
    """A graph pass: `__call__(graph)` rewrites in place and returns how many rewrites it made."""

    name: str = "pass"

    def __init__(self, context: PassContext) -> None:
        self.context = context

    @abc.abstractmethod
    def __call__(self, graph: fx.Graph) -> int:
        """Rewrite `graph` in place; return the number of rewrites."""

    def uuid(self) -> str:
        """A key that changes whenever the pass's source changes (for compile caches)."""
        source = inspect.getsource(type(self))
        return hashlib.sha256(source.encode()).hexdigest()[:16]


def node_value(node: fx.Node):
    """The fake tensor (or SymInt) recorded on a node, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_op(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
