"""CUDA-graph capture and replay: one wrapper, told its mode and how to key a call.

The same wrapper serves a compiled piece (``"piecewise"``), a whole compiled graph and the
engine's decode step with its LM head (``"full"``). What each mode means, and how a runtime
describes the running step, is in :mod:`infer.runtime.graphs`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from ..runtime import graphs
from .inner import call_boxed

logger = logging.getLogger("infer")


@dataclass(slots=True)
class CudaGraphStats:
    captured_graphs: int = 0
    pool_bytes: int = 0
    sizes: tuple = ()


class CudaGraphs:
    """How graphs are made: CUDA's. A test may stand in another device's (same methods)."""

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, pool, fn: Callable[[], object]):
        """Record ``fn()`` into ``graph``; returns its outputs (the graph's static outputs)."""
        with torch.cuda.graph(graph, pool=pool):
            return fn()

    def is_capturing(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def runs_on(self, args: Sequence) -> bool:
        return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def pool_handle(self):
        return torch.cuda.graph_pool_handle()

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated()


class CudaGraphPool:
    """One memory pool shared by every graph captured for one compiled model (or engine)."""

    def __init__(self, debug_addresses: bool = False, device_graphs: CudaGraphs | None = None) -> None:
        self.debug_addresses = debug_addresses
        self.device_graphs = device_graphs or CudaGraphs()
        self.stats = CudaGraphStats()
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            self._handle = self.device_graphs.pool_handle()
        return self._handle


@dataclass(slots=True)
class _Captured:
    graph: object
    inputs: list  # the static buffers the graph reads
    outputs: object
    static_ptrs: list[int]
    state: Hashable  # full mode: the splitting ops' per-step state the graph holds


def token_count_key(index: int | None) -> Callable[[list], Hashable]:
    """Key a call by dim 0 of input ``index`` (the graph's dynamic token count); None: one key."""
    if index is None:
        return lambda args: None
    return lambda args: args[index].shape[0]


class CudaGraphWrapper:
    """Replays one captured graph of ``fn`` per batch key, in one mode ("piecewise" or "full").

    A call is keyed by the running :class:`~infer.runtime.graphs.GraphStep` when the runtime
    describes one (its mode must be this wrapper's, else the call runs uncaptured), else by
    ``batch_key(args)``, captured only for keys in ``capture_keys`` and, in full mode, only for
    steps every splitting op calls capturable. Called through :meth:`__call__`, a key is captured
    the second time it is seen (the first call warms up Inductor/Triton); :meth:`capture` captures
    at once. Per replay: inputs at ``copy_indices`` are copied into the static buffers where their
    address moved; the others are read in place (with ``debug_addresses``, a moved static tensor
    is an error). A full graph replays only while the splitting ops' state is the one it holds.
    """

    _boxed_call = True

    def __init__(self, fn: Callable, mode: str, pool: CudaGraphPool, *, boxed: bool = True,
                 batch_key: Callable[[list], Hashable] = token_count_key(None),
                 capture_keys: Sequence | None = None, copy_indices: Sequence[int] = (),
                 static_indices: Sequence[int] = (), splitting_ops: Sequence[str] = ()) -> None:
        if mode not in ("piecewise", "full"):
            raise ValueError(f"a CUDA-graph wrapper's mode is 'piecewise' or 'full', got {mode!r}")
        self.fn = fn
        self.mode = mode
        self.pool = pool
        self.boxed = boxed
        self.batch_key = batch_key
        self.capture_keys = frozenset(capture_keys) if capture_keys is not None else None
        self.copy_indices = list(copy_indices)
        self.static_indices = list(static_indices)
        self.splitting_ops = [graphs.splitting_op(name) for name in splitting_ops]
        self.graphs: dict[Hashable, _Captured] = {}
        self.warmed: set[Hashable] = set()
        self.warned_other_weights = False

    def __contains__(self, key: Hashable) -> bool:
        return key in self.graphs

    def __call__(self, args: list):
        step = graphs.current_graph_step()
        if step is not None:
            if step.mode != self.mode:
                return self.run(args)
            key = step.batch_key
        else:
            key = self.batch_key(args)
            if self.capture_keys is not None and key is not None and key not in self.capture_keys:
                return self.run(args)
            if self.mode == "full" and not all(op.capturable() for op in self.splitting_ops):
                return self.run(args)
        device = self.pool.device_graphs
        if not device.runs_on(args) or device.is_capturing():
            return self.run(args)
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.warmed:
                self.warmed.add(key)
                return self.run(args)
            captured = self._capture(key, args)
        elif self.mode == "full" and captured.state != self._state():
            return self.run(args)  # other per-step buffers (another caller's metadata): run, do not replay
        elif self.static_indices and not self.pool.debug_addresses \
                and args[self.static_indices[0]].data_ptr() != captured.static_ptrs[0]:
            return self._other_weights(args)
        return self.replay(key, args)

    def run(self, args: list):
        """Call ``fn`` uncaptured."""
        return call_boxed(self.fn, args) if self.boxed else self.fn(*args)

    def capture(self, key: Hashable, args: list):
        """Capture the graph of ``key`` now (``fn`` warmed up already: nothing may compile or
        allocate lazily in it); returns its static outputs."""
        return self._capture(key, args).outputs

    def _capture(self, key: Hashable, args: list) -> _Captured:
        inputs = list(args)
        for i in self.copy_indices:  # same strides as the input: the compiled code may assume them
            a = args[i]
            inputs[i] = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device).copy_(a)
        device = self.pool.device_graphs
        allocated = device.memory_allocated()
        graph = device.new_graph()
        outputs = device.capture(graph, self.pool.handle, lambda: self.run(inputs))
        state = self._state() if self.mode == "full" else None
        captured = _Captured(graph, inputs, outputs, [args[i].data_ptr() for i in self.static_indices], state)
        self.graphs[key] = captured
        stats = self.pool.stats
        stats.captured_graphs += 1
        stats.pool_bytes += device.memory_allocated() - allocated  # the pool's live buffers
        if key is not None and key not in stats.sizes:
            stats.sizes = tuple(sorted(stats.sizes + (key,)))
        logger.debug("captured %s CUDA graph for batch key %s", self.mode, key)
        return captured

    def replay(self, key: Hashable, args: list):
        """Replay the graph of ``key`` on ``args``; returns its static outputs (valid until the
        next replay)."""
        captured = self.graphs[key]
        inputs = captured.inputs
        for i in self.copy_indices:
            if args[i].data_ptr() != inputs[i].data_ptr():
                inputs[i].copy_(args[i])
        if self.pool.debug_addresses:
            moved = [i for i, p in zip(self.static_indices, captured.static_ptrs) if args[i].data_ptr() != p]
            if moved:
                raise RuntimeError(f"static inputs {moved} moved since their CUDA graph was captured; "
                                   "a weight or KV cache was reallocated after compile")
        captured.graph.replay()
        return captured.outputs

    def _state(self) -> tuple:
        return tuple(op.state() for op in self.splitting_ops)

    def _other_weights(self, args: list):
        """Run uncaptured: the graph's weights are not the captured ones. Dynamo runs one graph
        for every module that reaches it the same way (after a graph break inside a repeated
        block each layer passes its own weights), and a replay would read the captured ones."""
        if not self.warned_other_weights:
            self.warned_other_weights = True
            logger.warning("a CUDA graph's weights differ from those it was captured with (one compiled "
                           "graph serves several modules, e.g. after a graph break in a repeated block): "
                           "those calls run without CUDA graphs")
        return self.run(args)
