"""Splits the transformed graph at every splitting op and compiles the pieces between them."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from .. import torch_internals as internals
from .config import CompilerConfig
from ..runtime import graphs
from .cudagraph import CudaGraphPool, CudaGraphWrapper, token_count_key
from .inner import call_boxed, inner_compile
from .report import CompileReport


def splitting_nodes(graph: fx.Graph, splitting_ops: Sequence[str]) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and _op_name(n.target) in splitting_ops]


def compile_pieces(gm: fx.GraphModule, example_inputs: Sequence, is_static: list[bool],
                   config: CompilerConfig, report: CompileReport) -> Callable:
    """One callable for the graph: compiled pieces around the splitting ops, CUDA graphs if asked."""
    pool = None
    if config.cudagraph_mode != "none":
        pool = CudaGraphPool(config.debug_cudagraph_addresses)
    report.cudagraphs = pool.stats if pool is not None else None
    present = splitting_nodes(gm.graph, config.splitting_ops)
    splits = [] if config.cudagraph_mode == "full" else present
    if not splits:
        report.pieces = 1
        compiled = inner_compile(gm, example_inputs, config.inner_compiler)
        held = sorted({_op_name(n.target) for n in present})  # a full graph holds these ops' state
        report.split_ops_run_on = _describe(held, example_inputs)
        return _wrap_graphs(compiled, example_inputs, is_static, config, pool, held)
    for node in splits:
        name = _op_name(node.target)
        report.split_ops[name] = report.split_ops.get(name, 0) + 1
    split_gm = _split(gm, splits)
    report.pieces = _compile_submodules(split_gm, example_inputs, is_static, config, pool)
    report.split_ops_run_on = _describe(sorted(report.split_ops), example_inputs)
    return internals.make_boxed_func(split_gm.forward)


def piece_inputs(graph: fx.Graph, config: CompilerConfig) -> set[fx.Node]:
    """The nodes whose values some piece takes as an input: the graph's placeholders and every value
    used across a split. Only these need example values when the inner compiler is eager."""
    splits = [] if config.cudagraph_mode == "full" else splitting_nodes(graph, config.splitting_ops)
    assignment = _assignment(graph, splits)
    crossing = {n for n in assignment if any(assignment.get(u, -1) != assignment[n] for u in n.users)}
    return set(graph.find_nodes(op="placeholder")) | crossing


def _split(gm: fx.GraphModule, splits: list[fx.Node]) -> fx.GraphModule:
    assignment = _assignment(gm.graph, splits)
    return split_module(gm, None, lambda n: assignment[n], keep_original_order=True)


def _assignment(graph: fx.Graph, splits: list[fx.Node]) -> dict[fx.Node, int]:
    """Pieces numbered in graph order; every splitting node is a piece of its own."""
    split_set, piece, assignment = set(splits), 0, {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node in split_set:
            piece += 1
            assignment[node] = piece
            piece += 1
        else:
            assignment[node] = piece
    return assignment


def _compile_submodules(split_gm: fx.GraphModule, example_inputs: Sequence, is_static: list[bool],
                        config: CompilerConfig, pool) -> int:
    """Compile each piece that holds no splitting op; return how many (splitting-op calls + 1).

    A piece is compiled for the values its inputs carry in the graph: `split_module` copies each
    node's metadata onto the placeholders that stand for it, so no fake run of the split graph
    is needed. Inputs of the whole graph are the example inputs themselves (static where the
    caller says so); values made by an earlier piece are never static."""
    graph_inputs = dict(zip(split_gm.graph.find_nodes(op="placeholder"), zip(example_inputs, is_static)))
    splitting = set(config.splitting_ops)
    compiled = 0
    mode = internals.detect_fake_mode(example_inputs)
    with mode if mode is not None else torch.no_grad():
        for node in split_gm.graph.find_nodes(op="call_module"):
            submod = split_gm.get_submodule(node.target)
            if any(_op_name(n.target) in splitting for n in submod.graph.nodes if n.op == "call_function"):
                _call_directly(submod)
                continue
            placeholders = submod.graph.find_nodes(op="placeholder")
            assert len(placeholders) == len(node.args), "split_module feeds every placeholder one argument"
            values = [graph_inputs.get(a, (p.meta.get("val"), False)) for a, p in zip(node.args, placeholders)]
            args, static = [v for v, _ in values], [s for _, s in values]
            piece = inner_compile(submod, args, config.inner_compiler)
            setattr(split_gm, node.target, _Piece(_wrap_graphs(piece, args, static, config, pool)))
            compiled += 1
    return compiled


def _call_directly(submod: fx.GraphModule) -> None:
    """Splitting ops run eagerly between the pieces: call their Python implementation itself and
    skip the dispatcher (tens of microseconds per call, per layer, per step)."""
    for node in submod.graph.nodes:
        fn = internals.custom_op_function(node.target) if node.op == "call_function" else None
        if fn is not None and not node.kwargs:
            node.target = fn
    submod.recompile()


def _describe(op_names: list[str], example_inputs: Sequence) -> str | None:
    """What the splitting ops run on, as their owners describe it (for the report)."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    described = [d for d in (graphs.splitting_op(name).describe(device) for name in op_names) if d]
    return ", ".join(described) or None


class _Piece(torch.nn.Module):
    """A compiled piece called like the submodule it replaces."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return call_boxed(self.fn, list(args))


def _wrap_graphs(compiled: Callable, example_inputs: Sequence, is_static: list[bool], config: CompilerConfig,
                 pool, held_ops: Sequence[str] = ()) -> Callable:
    """A CUDA-graph wrapper in the config's mode, keyed by the graph's dynamic token count: dim 0 of
    the first input whose dim 0 is symbolic. Static inputs (parameters, buffers) are read in place;
    the others are copied into the graph's buffers."""
    if pool is None:
        return compiled
    tensors = [(i, s) for i, (t, s) in enumerate(zip(example_inputs, is_static)) if isinstance(t, torch.Tensor)]
    size_index = next((i for i, _ in tensors if example_inputs[i].dim() > 0
                       and isinstance(example_inputs[i].shape[0], torch.SymInt)), None)
    return CudaGraphWrapper(compiled, config.cudagraph_mode, pool, batch_key=token_count_key(size_index),
                            capture_keys=config.cudagraph_capture_sizes,
                            copy_indices=[i for i, s in tensors if not s],
                            static_indices=[i for i, s in tensors if s], splitting_ops=held_ops)


def _op_name(target) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None
