"""Compiling a graph the compile cache saved, exactly as a later process loads it.

A cold compile that is being cached compiles the saved-and-reloaded copy too
(:func:`same_as_reloaded`), inside a tracing context of its own (:func:`fresh_tracing`): the inner
compiler then sees the same graph, values and context in both processes, so a warm load hits
Inductor's FX graph cache instead of lowering and generating code again.
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import torch
from torch import fx

from .. import torch_internals as internals
from .config import CompilerConfig
from .graph_io import load_graph


def reloaded(nodes: list, config: CompilerConfig) -> tuple[fx.GraphModule, list]:
    """A saved graph (`dump_graph`'s nodes) as a module, with the values of its inputs."""
    from .split import piece_inputs

    eager = config.inner_compiler == "eager"  # Inductor reads every node's value, eager only the pieces' inputs
    with torch.inference_mode(False):  # values as Dynamo makes them: part of Inductor's cache key
        graph = load_graph(nodes, (lambda g: piece_inputs(g, config)) if eager else None)
    with internals.plain_graph_modules():  # one kind of module in and out of Dynamo (pickled into the key)
        gm = fx.GraphModule(torch.nn.Module(), graph)
    return gm, [p.meta["val"] for p in graph.find_nodes(op="placeholder")]


def same_as_reloaded(nodes: list, config: CompilerConfig) -> tuple[fx.GraphModule, list]:
    """A recorded graph (`dump_graph`'s nodes) through JSON and loaded again, as a later process
    loads it: inner-compiling this copy gives Inductor's FX graph cache the key a warm load asks for."""
    return reloaded(json.loads(json.dumps(nodes)), config)


@contextlib.contextmanager
def fresh_tracing(values: list) -> Iterator[None]:
    """A new tracing context around the fake mode of `values` (none found: no context), and plain
    (not lazy) graph modules. Inductor bypasses its FX graph cache without a tracing context ("No
    shape env"); a context of its own, and one module kind (their attributes are pickled into the
    key), give a compile inside Dynamo the key a warm load outside it asks for."""
    # the values' own mode: detect_fake_mode would prefer that of the tracing context already open
    mode = internals.fake_mode_of(values)
    if mode is None:
        yield
        return
    with internals.tracing_context(mode):
        yield
