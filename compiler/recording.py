"""What ``backend="infer"`` compiled while a recording was active: the saved form of each graph.

A recording (``with recording() as rec``) collects, per graph the backend compiles, the ATen graph
the passes produced with each placeholder bound to where its value comes from at call time (a
parameter or buffer by name, an argument, a size of an argument, or a weight pack to make again),
and the reasons a graph cannot be saved. :mod:`.cache` writes and loads what it holds; stage-by-stage
compilation (:mod:`.stages`) tags each graph with the stage that was running.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Callable, Iterator, Sequence

import torch
from torch import fx

from .. import torch_internals as internals
from .config import CompilerConfig
from .graph_io import Unsupported, dump_graph

_LOCAL = r"L\['([A-Za-z_]\w*)'\]"
_MODULE_TENSOR = re.compile(rf"^{_LOCAL}((?:\._modules\['[^']+'\])*)\._(parameters|buffers)\['([^']+)'\]$")
_ARGUMENT = re.compile(rf"^{_LOCAL}$")
_SIZE = re.compile(rf"^{_LOCAL}\.size\(\)\[(\d+)\]$")
_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("infer_cache_recording", default=None)


class Recording:
    """What `backend="infer"` compiled while `recording()` was active: graphs and reasons not to cache."""

    def __init__(self) -> None:
        self.graphs: list[dict] = []
        self.problems: list[str] = []
        self.graph_breaks = graph_breaks()
        self.stage_tuples: dict[str, bool] = {}  # stage name -> whether it returned a tuple

    def recorder(self, gm: fx.GraphModule, example_inputs: Sequence, config: CompilerConfig,
                 report) -> Callable[[fx.GraphModule, list], None]:
        """Called by the pipeline with the Dynamo graph; returns what it calls after the passes."""
        inputs = _dynamo_inputs(gm, example_inputs, self.problems)
        stage = current_stage()

        entry: dict = {}

        def record(transformed: fx.GraphModule, recipes: list) -> dict | None:
            """The recorded entry (its "graph" is what is saved); None if it cannot be saved."""
            try:
                entry.update(_entry(transformed, inputs, recipes, config, report), stage=stage)
            except Unsupported as e:
                self.problems.append(str(e))
                return None
            self.graphs.append(entry)
            return entry

        def attach(compiled: Callable) -> None:
            """The callable Dynamo runs for the graph (Dynamo's inputs, packs added inside)."""
            if entry:
                entry["runtime"] = compiled
        record.attach = attach
        return record


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record every graph `backend="infer"` compiles in this context (for `store`)."""
    rec = Recording()
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)


def current_recording() -> Recording | None:
    return _RECORDING.get()


def _entry(gm: fx.GraphModule, inputs: list[dict] | None, recipes: list, config: CompilerConfig, report) -> dict:
    """The saved form of one transformed graph (raises Unsupported)."""
    outputs = _check_aot_metadata()
    placeholders = gm.graph.find_nodes(op="placeholder")
    if inputs is None or len(placeholders) != len(inputs) + len(recipes):
        raise Unsupported("the graph's inputs do not line up with Dynamo's")
    bindings = list(inputs)
    names = {p.name: i for i, p in enumerate(placeholders)}
    for recipe in recipes:
        if recipe is None or recipe[0] != "pack" or any(inputs[names[n]]["kind"] != "tensor" for n in recipe[1]):
            raise Unsupported(f"a pass made an input the cache cannot make again: {recipe}")
        bindings.append({"kind": "pack", "of": [names[n] for n in recipe[1]]})
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"graph": dump_graph(gm.graph), "inputs": bindings, "config": options, "outputs": outputs,
            "report": {"passes": dict(report.passes), "fusions": dict(report.fusions),
                       "nodes_before": report.nodes_before}}


def _dynamo_inputs(gm: fx.GraphModule, example_inputs: Sequence, problems: list[str]) -> list[dict] | None:
    """Where each Dynamo graph input comes from, by its guard source; None (with a problem) if unknown."""
    from torch.fx.experimental.symbolic_shapes import free_symbols, free_unbacked_symbols

    out = []
    for node, real in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        value = node.meta.get("example_value", real)  # the fake one, with symbolic sizes
        name = internals.source_name(node)
        if free_symbols(value) != free_unbacked_symbols(value):
            problems.append(f"{name} has backed dynamic sizes, whose guards the cache does not check")
            return None
        if (m := _MODULE_TENSOR.match(name or "")) and m.group(1) == "self":
            path = ".".join(re.findall(r"\['([^']+)'\]", m.group(2)))
            out.append({"kind": "tensor", "path": path, "dict": f"_{m.group(3)}", "name": m.group(4),
                        "shape": list(value.shape), "dtype": str(value.dtype), "device": str(value.device)})
        elif m := _ARGUMENT.match(name or ""):
            if not isinstance(value, torch.Tensor):
                problems.append(f"argument {name} is not a tensor")
                return None
            out.append({"kind": "input", "arg": m.group(1), "dtype": str(value.dtype), "device": value.device.type,
                        "shape": [d if isinstance(d, int) else None for d in value.shape]})
        elif m := _SIZE.match(name or ""):
            out.append({"kind": "size", "arg": m.group(1), "dim": int(m.group(2))})
        else:
            problems.append(f"graph input {node.name} comes from {name!r}")
            return None
    return out


def _check_aot_metadata() -> int:
    try:
        return internals.aot_output_count()
    except ValueError as e:
        raise Unsupported(str(e)) from None


def graph_breaks() -> int:
    return internals.graph_break_count()


_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("infer_stage", default=None)


def current_stage() -> str | None:
    """The name of the stage whose compiled function is running, if any."""
    return _STAGE.get()


@contextlib.contextmanager
def running_stage(name: str) -> Iterator[None]:
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)
