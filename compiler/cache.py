"""Compile cache: a later process loads the transformed graph instead of running Dynamo, AOT and passes.

What is saved is the ATen graph the passes produced (before the split), with each placeholder
bound to where its value comes from at call time: a parameter or buffer of the module (by
name), an argument of `forward`, a size of an argument, or a tensor to make again at load
(a weight pack). Loading splits and inner-compiles that graph exactly as a cold compile does
(:mod:`.reload`; a cold compile being recorded compiles the same reloaded copy, so Inductor's own
cache serves the warm load). Usage, around the first compiled call::

    key = cache_key(model, options, extra=f"tp {rank}/{size}")
    forward = lookup(directory, key, model)             # None: no entry, or one that is unusable
    if forward is None:
        compiled = torch.compile(model.forward, backend="infer", options=options)
        with recording() as rec:
            out = compiled(ids, positions)               # the first call compiles
        store(directory, key, rec, model.forward, out)   # None (logged) if it cannot be cached

Saved only when Dynamo made exactly one graph with no graph break, whose one output aliases no
input and whose mutations all happen in the graph. A model compiled stage by stage saves one
graph per stage in one entry (:mod:`.stages`: `store_stages`, `lookup_stages`). The key covers
everything the graph depends on that this module can see; `extra` must add the rest
(tensor-parallel rank, ...).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .config import CompilerConfig
from .inner import call_boxed
from .pipeline import compile_transformed
from .report import REPORTS, CompileReport
from .recording import Recording, current_recording, graph_breaks, recording  # noqa: F401 (re-exported)
from .reload import fresh_tracing, reloaded

logger = logging.getLogger("infer")

FORMAT = 2


def cache_key(module: torch.nn.Module, options: dict | CompilerConfig | None, extra: str = "") -> str:
    """sha256 of the versions, this package's source, the module's class, config and tensors, the options."""
    import transformers

    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        config = json.dumps(fields, sort_keys=True, default=str)
    parts = [f"format {FORMAT}", f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"python {sys.version_info[:2]}", f"source {source_digest()}",
             f"module {type(module).__module__}.{type(module).__qualname__}", f"config {config!r}",
             f"options {CompilerConfig.from_options(options).cache_key()}",
             f"passes {_passes_uuid(CompilerConfig.from_options(options))}", f"extra {extra}"]
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    parts += [f"{name} {tuple(t.shape)} {t.dtype} {t.device}" for name, t in tensors]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _passes_uuid(config: CompilerConfig) -> str:
    """The uuid of the pass list ``config`` runs (each pass's source and options)."""
    from ..passes.base import PassContext
    from ..passes.manager import PassManager, PassOptions
    return PassManager(PassOptions.of(config), PassContext()).uuid()


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 over the package source a graph can depend on: compiler, passes, models, and the
    runtime's ops, attention and distributed helpers. Kernels and the engine only run the graph."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("compiler", "passes", "models", "runtime") for p in (root / folder).rglob("*.py")):
        if path.parent.name not in ("kernels", "engine"):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def store(directory: str | os.PathLike, key: str, rec: Recording, forward: Callable, output: object) -> Path | None:
    """Save the one graph `rec` holds for `key`; None (logged) when it cannot be cached.

    `forward` is the function that was compiled (its parameters name the call's arguments) and
    `output` what the recorded call returned (it must be the graph's one output, a tensor)."""
    problems = list(rec.problems)
    if graph_breaks() != rec.graph_breaks:
        problems.append("Dynamo broke the graph")
    if len(rec.graphs) != 1:
        problems.append(f"{len(rec.graphs)} graphs were compiled, not 1")
    if not isinstance(output, torch.Tensor) or len(rec.graphs) == 1 and rec.graphs[0]["outputs"] != 1:
        problems.append(f"the call returned a {type(output).__name__}, not a tensor")
    args = [p.name for p in inspect.signature(forward).parameters.values()]
    for b in rec.graphs[0]["inputs"] if len(rec.graphs) == 1 else []:
        if b["kind"] in ("input", "size") and b["arg"] not in args:
            problems.append(f"graph input from {b['arg']!r}, which is not a parameter of {forward!r}")
    if problems:
        logger.warning("compile cache: not storing %s: %s", key[:12], "; ".join(problems))
        return None
    return write_entry(directory, key, dict(saved_form(rec.graphs[0]), args=args))


def saved_form(graph: dict) -> dict:
    """A recorded graph without what is not saved (its callable in this process)."""
    return {k: v for k, v in graph.items() if k != "runtime"}


def write_entry(directory: str | os.PathLike, key: str, data: dict) -> Path:
    """Write `data` (with the format and key added) as the entry for `key`, atomically."""
    path = entry_path(directory, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data, format=FORMAT, key=key)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        try:
            json.dump(data, f)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)  # readers see the old file or the whole new one
    logger.info("compile cache: stored %s", path)
    return path


def load_entry(directory: str | os.PathLike, key: str, load: Callable[[dict], Any]) -> Any:
    """`load(data)` of the entry for `key`; None if absent or unusable (warned, never raised)."""
    path = entry_path(directory, key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("key") != key:
            raise ValueError(f"format {data.get('format')!r} / key do not match")
        return load(data)
    except Exception as e:  # noqa: BLE001 - a corrupt or stale entry is a miss, never an error
        logger.warning("compile cache: ignoring %s (%s: %s)", path, type(e).__name__, e)
        return None


def lookup(directory: str | os.PathLike, key: str, module: torch.nn.Module) -> CachedForward | None:
    """The compiled forward saved for `key`, bound to `module`; None if absent or unusable (warned)."""
    return load_entry(directory, key, lambda data: _load(data, module))


class CachedForward:
    """Calls a loaded graph the way the compiled `forward` it was saved from is called."""

    def __init__(self, compiled: Callable, feeds: list[tuple], args: list[str], checks: dict, report) -> None:
        self.compiled = compiled
        self.feeds = feeds  # per graph input: ("tensor", dict, key) / ("arg", i, None) / ("size", i, dim)
        self.args = args
        self.checks = checks  # argument index -> (dtype, sizes with None where dynamic, device type)
        self.report = report

    def __call__(self, *args):
        if len(args) != len(self.args):
            raise TypeError(f"expected {len(self.args)} arguments ({', '.join(self.args)}), got {len(args)}")
        check_args(self.checks, self.args, args)
        flat = [feed(f, args) for f in self.feeds]
        if torch.is_grad_enabled():
            with torch.no_grad():
                return call_boxed(self.compiled, flat)[0]
        return call_boxed(self.compiled, flat)[0]


def check_args(checks: dict, names: list[str], args: tuple) -> None:
    """ValueError unless each checked argument has the dtype, fixed sizes and device it was compiled for."""
    for i, (dtype, shape, device) in checks.items():
        a = args[i]
        if not isinstance(a, torch.Tensor) or a.dtype != dtype or a.device.type != device or a.dim() != len(shape) \
                or any(n is not None and n != d for n, d in zip(shape, a.shape)):
            sizes = ", ".join("any" if n is None else str(n) for n in shape)
            raise ValueError(f"argument {names[i]!r} must be a [{sizes}] {dtype} tensor on {device} "
                             f"(as when it was compiled), got {_describe(a)}")


def feed(feed: tuple, args: tuple) -> object:
    kind, where, which = feed
    if kind == "tensor":
        return where[which]  # the module's _parameters / _buffers now: rebinding a buffer is seen
    return args[where] if kind == "arg" else args[where].shape[which]


def _load(data: dict, module: torch.nn.Module) -> CachedForward:
    feeds, constants, checks = bind(data["inputs"], data["args"], module)
    compiled, report = compile_entry(data, constants)
    return CachedForward(compiled, feeds, data["args"], checks, report)


def bind(bindings: list[dict], args: list[str], module: torch.nn.Module) -> tuple[list, list, dict]:
    """(feeds, constants, checks) for `CachedForward` or a stage's module: module tensors are checked
    against the entry,
    weight packs made again (the module's weights become views of them, as in a cold compile)."""
    from ..passes.gemm_pack import pack_in_place

    feeds, constants, tensors, checks = [], [], {}, {}
    for i, b in enumerate(bindings):
        if b["kind"] == "tensor":
            owner = getattr(module.get_submodule(b["path"]), b["dict"])
            t = tensors[i] = owner[b["name"]]
            if [list(t.shape), str(t.dtype), str(t.device)] != [b["shape"], b["dtype"], b["device"]]:
                raise ValueError(f"{b['path']}.{b['name']} is {tuple(t.shape)} {t.dtype} on {t.device}, "
                                 f"the entry has {tuple(b['shape'])} {b['dtype']} on {b['device']}")
            feeds.append(("tensor", owner, b["name"]))
        elif b["kind"] == "pack":
            constants.append(pack_in_place([tensors[j] for j in b["of"]]))
        elif constants:
            raise ValueError("a call argument follows the packed weights")
        elif b["kind"] == "input":
            feeds.append(("arg", args.index(b["arg"]), None))
            checks[args.index(b["arg"])] = (getattr(torch, b["dtype"].removeprefix("torch.")), b["shape"], b["device"])
        else:
            feeds.append(("size", args.index(b["arg"]), b["dim"]))
    return feeds, constants, checks


def entry_path(directory: str | os.PathLike, key: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"cache key must be a sha256 hex digest (see cache_key), got {key!r}")
    return Path(directory) / f"{key}.json"


def _describe(a: object) -> str:
    if isinstance(a, torch.Tensor):
        return f"a {list(a.shape)} {a.dtype} tensor on {a.device.type}"
    return f"a {type(a).__name__}"


def compile_entry(data: dict, constants: list) -> tuple[Callable, Any]:
    """Split and inner-compile a saved graph; `constants` (weight packs) are appended to its inputs
    by the returned callable (none: the caller appends them). Returns (callable, report)."""
    config = CompilerConfig.from_options(data["config"])
    gm, values = reloaded(data["graph"], config)
    if len(data["inputs"]) != len(values):
        raise ValueError(f"{len(data['inputs'])} input bindings for {len(values)} graph inputs")
    report = CompileReport(inner_compiler=config.inner_compiler, cudagraph_mode=config.cudagraph_mode, cached=True,
                           passes=data["report"]["passes"], fusions=data["report"]["fusions"],
                           nodes_before=data["report"]["nodes_before"], nodes_after=len(gm.graph.nodes))
    frames_before = REPORTS.frames_compiled()
    is_static = [b["kind"] in ("tensor", "pack") for b in data["inputs"]]
    with fresh_tracing(values):
        compiled = compile_transformed(gm, values, is_static, constants, config, report)
    report.time_total_s = report.time_inner_s
    REPORTS.publish(report, frames_before)
    return compiled, report
