"""Compile a model stage by stage: a ``NamedTuple`` of stage functions, each called
``stage(module, *tensors)`` (the models' ``Stages``: prepare, layer, finish).

Dynamo traces each stage function once, with the module's weights as graph inputs
(``inline_inbuilt_nn_modules``), so one graph serves every decoder layer: tracing, AOT and the
inner compiler cost one layer instead of the whole stack. The residual stream crosses stage
boundaries un-added, so every fusion a whole-model graph finds lies inside one stage.

A stage named in ``plain`` runs as written, uncompiled (:class:`PlainStage`): with the eager inner
compiler, a stage with nothing to fuse (:data:`UNFUSED_STAGES`) gains nothing from its graph but
costs a Dynamo trace and an AOT pass at startup.

Only for graphs without per-graph CUDA-graph capture (``cudagraph_mode="none"``): piecewise
graphs are captured with the first module's weights and would not replay for the others. An
engine capturing whole steps (full decode graphs) is the intended user.
"""
from __future__ import annotations

import abc
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .. import torch_internals as internals
from . import cache, recording
from .errors import InferUsageError
from .inner import call_boxed

logger = logging.getLogger("infer")

# Stages that hold no pattern a fusion pass rewrites: ``prepare`` is the embedding lookup and the
# rotary tables (every pass finds 0 there; test_the_prepare_stage_has_nothing_to_fuse).
UNFUSED_STAGES = ("prepare",)

class CompiledStage:
    """``torch.compile(fn, backend="infer")`` called as ``stage(module, *tensors)``.

    Dim 0 (tokens) of every tensor argument is unbacked, as for a whole forward: one graph serves
    every token count, with no 0/1 specialisation. One compiled function for all modules keeps
    one Dynamo cache entry: its guards check the module's type and tensors, not its identity.
    """

    def __init__(self, name: str, fn: Callable, options: Mapping[str, Any]) -> None:
        self.name = name
        self.fn = fn
        self.compiled = torch.compile(fn, backend="infer", options=dict(options))

    def __call__(self, module: torch.nn.Module, *args: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                internals.mark_unbacked(a, 0)
        with recording.running_stage(self.name):
            out = self.compiled(module, *args)
        rec = recording.current_recording()
        if rec is not None:
            rec.stage_tuples[self.name] = isinstance(out, tuple)
        return out

    def __repr__(self) -> str:
        return f"CompiledStage({self.name}: {getattr(self.fn, '__qualname__', self.fn)!r})"


class PlainStage:
    """A stage run as written, ``fn(module, *args)``: uncompiled, and stored as such in the cache."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, module: torch.nn.Module, *args: Any) -> Any:
        return self.fn(module, *args)

    def __repr__(self) -> str:
        return f"PlainStage({self.name}: {getattr(self.fn, '__qualname__', self.fn)!r})"


Stages = tuple  # a NamedTuple of stage functions or stage callables; its fields name the stages


def compile_stages(stages: Stages, options: Mapping[str, Any], plain: Sequence[str] = ()) -> Stages:
    """Each stage of ``stages`` compiled on its own with backend options ``options``; the stages
    named in ``plain`` stay uncompiled (:class:`PlainStage`)."""
    if options.get("cudagraph_mode", "none") != "none":
        raise InferUsageError(
            f"stage-by-stage compilation needs cudagraph_mode='none' (got {options['cudagraph_mode']!r}): "
            "CUDA graphs captured per piece hold the first module's weights; capture whole steps instead")
    _check_stage_names(stages, plain)
    return type(stages)(*(PlainStage(name, fn) if name in plain else CompiledStage(name, fn, options)
                          for name, fn in zip(stages._fields, stages)))


def _check_stage_names(stages: Stages, names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(stages._fields))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stages are {list(stages._fields)}")


def _stage_functions(compiled: Stages) -> Iterator[tuple[str, Callable, bool]]:
    """``(name, plain function, runs uncompiled)`` per stage of what :func:`compile_stages` made."""
    for name, stage in zip(compiled._fields, compiled):
        if not isinstance(stage, (CompiledStage, PlainStage)):
            raise TypeError(f"stage {name!r}: expected a CompiledStage or PlainStage (from compile_stages), "
                            f"got {type(stage).__name__}")
        yield name, stage.fn, isinstance(stage, PlainStage)


def store_stages(directory: str | os.PathLike, key: str, rec: recording.Recording, compiled: Stages) -> Path | None:
    """Save the graphs `rec` holds, one per compiled stage of `compiled` (from :func:`compile_stages`;
    a :class:`PlainStage` is saved as such), as one entry for `key`; None (logged) when they cannot
    be cached."""
    problems = list(rec.problems)
    if recording.graph_breaks() != rec.graph_breaks:
        problems.append("Dynamo broke a graph")
    saved = {}
    num_compiled = 0
    for name, fn, plain in _stage_functions(compiled):
        if plain:
            saved[name] = {"plain": True}
            continue
        num_compiled += 1
        graphs = [g for g in rec.graphs if g["stage"] == name]
        if len(graphs) != 1 or name not in rec.stage_tuples:
            problems.append(f"stage {name!r}: {len(graphs)} graphs were compiled, not 1")
            continue
        args = [p.name for p in inspect.signature(fn).parameters.values()][1:]  # after the module
        problems += [f"stage {name!r}: graph input from {b['arg']!r}, which is not a parameter"
                     for b in graphs[0]["inputs"] if b["kind"] in ("input", "size") and b["arg"] not in args]
        if not rec.stage_tuples[name] and graphs[0]["outputs"] != 1:
            problems.append(f"stage {name!r} returned {graphs[0]['outputs']} tensors outside a tuple")
        saved[name] = dict(cache.saved_form(graphs[0]), args=args, tuple=rec.stage_tuples[name])
    if len(rec.graphs) != num_compiled:
        problems.append(f"{len(rec.graphs)} graphs for {num_compiled} compiled stages")
    if problems:
        logger.warning("compile cache: not storing %s: %s", key[:12], "; ".join(problems))
        return None
    return cache.write_entry(directory, key, {"stages": saved})


def direct_stages(rec: recording.Recording, compiled: Stages) -> Stages | None:
    """The stages of `compiled` that `rec` recorded (see :func:`store_stages`), called without
    Dynamo's guards from now on (a :class:`PlainStage` stays as it is); None unless every compiled
    stage has exactly one graph with its callable."""
    direct = []
    for name, fn, plain in _stage_functions(compiled):
        if plain:
            direct.append(PlainStage(name, fn))
            continue
        graphs = [g for g in rec.graphs if g["stage"] == name]
        if len(graphs) != 1 or "runtime" not in graphs[0] or name not in rec.stage_tuples:
            return None
        args = [p.name for p in inspect.signature(fn).parameters.values()][1:]
        direct.append(DirectStage(name, graphs[0], args, rec.stage_tuples[name]))
    return type(compiled)(*direct)


def lookup_stages(directory: str | os.PathLike, key: str, stages: Stages) -> Stages | None:
    """The stages saved for `key` (`stages`, the stage functions, name them), each compiled once
    and bound to a module at its first call with it; a stage saved as plain runs its function
    from `stages`. None if absent or unusable (warned)."""
    def load(data: dict) -> Stages:
        loaded = []
        for name, fn in zip(stages._fields, stages):
            entry = data["stages"][name]
            loaded.append(PlainStage(name, fn) if entry.get("plain") else CachedStage(name, entry))
        return type(stages)(*loaded)
    return cache.load_entry(directory, key, load)


class _BoundStage(abc.ABC):
    """A stage graph called as ``stage(module, *args)`` without Dynamo: each module is bound at its
    first call (its tensors checked against the recorded inputs); subclasses say how to run."""

    def __init__(self, name: str, bindings: list[dict], args: list[str], is_tuple: bool) -> None:
        self.name = name
        self.bindings = bindings
        self.args = args
        self.tuple = is_tuple
        self._bound: dict[int, tuple] = {}  # id(module) -> (module, feeds, constants, checks)

    def __call__(self, module: torch.nn.Module, *args: Any) -> Any:
        bound = self._bound.get(id(module))
        if bound is None or bound[0] is not module:
            bound = self._bound[id(module)] = (module, *cache.bind(self.bindings, self.args, module))
        _, feeds, constants, checks = bound
        if len(args) != len(self.args):
            raise TypeError(f"stage {self.name!r} takes {len(self.args)} arguments ({', '.join(self.args)}), "
                            f"got {len(args)}")
        cache.check_args(checks, self.args, args)
        out = self._run([cache.feed(f, args) for f in feeds] + constants)
        return tuple(out) if self.tuple else out[0]

    @abc.abstractmethod
    def _run(self, flat: list) -> Any:
        """Run the graph on its flat inputs (Dynamo's order); returns its outputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self._bound)} modules bound)"


class CachedStage(_BoundStage):
    """A stage loaded from the compile cache. Binding a module makes its weight packs (its weights
    become views of them, as in a cold compile), appended to the graph's inputs."""

    def __init__(self, name: str, data: dict) -> None:
        super().__init__(name, data["inputs"], data["args"], data["tuple"])
        self.compiled, self.report = cache.compile_entry(data, [])

    def _run(self, flat: list) -> Any:
        with torch.no_grad():
            return call_boxed(self.compiled, flat)


class DirectStage(_BoundStage):
    """A stage compiled in this process, called with the inputs Dynamo would pass, without
    evaluating its guards (each call of a guarded frame costs ~0.1 ms of host time, for every layer
    of every uncaptured step). Weight packs are made inside the callable, so none are bound."""

    def __init__(self, name: str, graph: dict, args: list[str], is_tuple: bool) -> None:
        super().__init__(name, [b for b in graph["inputs"] if b["kind"] != "pack"], args, is_tuple)
        self.compiled = graph["runtime"]

    def _run(self, flat: list) -> Any:
        return self.compiled(*flat)  # as Dynamo calls it
