"""CUDA-graph capture and replay of compiled graphs (a piece, or the whole graph in full mode)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..runtime.attention.context import current_forward_context
from .inner import call_boxed

logger = logging.getLogger("infer")


@dataclass(slots=True)
class CudaGraphStats:
    captured_graphs: int = 0
    pool_bytes: int = 0
    sizes: tuple[int, ...] = ()


class CudaGraphPool:
    """One memory pool shared by every graph captured for one compiled model."""

    def __init__(self, debug_addresses: bool = False, full_graph: bool = False) -> None:
        self.debug_addresses = debug_addresses
        self.full_graph = full_graph  # graphs hold the attention op: its metadata must not move
        self.stats = CudaGraphStats()
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


@dataclass(slots=True)
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # static buffers the graph reads
    outputs: object
    static_ptrs: list[int]
    metadata_ptrs: tuple[int, ...] | None  # full graphs: the attention metadata baked into the graph


class CudaGraphRunner:
    """Replays one captured graph per token count.

    The token count is dim 0 of the first input whose dim 0 is symbolic. A size is captured the
    second time it is seen (the first call warms up Inductor/Triton); sizes that are not in
    `capture_sizes` run without graphs. Callers pad to a captured size. Per replay: inputs whose
    address moved are copied into the static buffers, then the graph replays; parameters and
    other static inputs are read in place (with `debug_addresses`, a moved one is an error).
    """

    def __init__(self, compiled: Callable, example_inputs: Sequence, is_static: list[bool],
                 capture_sizes: Sequence[int], pool: CudaGraphPool) -> None:
        self.compiled = compiled
        self.pool = pool
        self.capture_sizes = frozenset(capture_sizes)
        self.size_index = next((i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)
                                and t.dim() > 0 and isinstance(t.shape[0], torch.SymInt)), None)
        self.copy_indices = [i for i, (t, s) in enumerate(zip(example_inputs, is_static))
                             if isinstance(t, torch.Tensor) and not s]
        self.static_indices = [i for i, (t, s) in enumerate(zip(example_inputs, is_static))
                               if isinstance(t, torch.Tensor) and s]
        self.graphs: dict[int | None, _Captured] = {}
        self.warmed: set[int | None] = set()
        self.warned_other_weights = False
    _boxed_call = True

    def __call__(self, args: list):
        size = args[self.size_index].shape[0] if self.size_index is not None else None
        captured = self.graphs.get(size)
        if captured is not None:
            if captured.metadata_ptrs is not None and captured.metadata_ptrs != _metadata_ptrs():
                return call_boxed(self.compiled, args)  # other metadata (a prefill): run, do not replay
            if self.static_indices and args[self.static_indices[0]].data_ptr() != captured.static_ptrs[0] \
                    and not self.pool.debug_addresses:
                return self._other_weights(args)
            return self._replay(captured, args)
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        if not on_cuda or (size is not None and size not in self.capture_sizes) \
                or torch.cuda.is_current_stream_capturing():
            return call_boxed(self.compiled, args)
        if self.pool.full_graph and not _is_uniform_decode():
            return call_boxed(self.compiled, args)  # full graphs are captured for decode steps only
        if size not in self.warmed:
            self.warmed.add(size)
            return call_boxed(self.compiled, args)
        return self._replay(self._capture(size, args), args)

    def _capture(self, size, args: list) -> _Captured:
        inputs = list(args)
        for i in self.copy_indices:  # same strides as the input: the compiled code may assume them
            a = args[i]
            inputs[i] = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device).copy_(a)
        allocated = torch.cuda.memory_allocated()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle):
            outputs = call_boxed(self.compiled, inputs)
        metadata = _metadata_ptrs() if self.pool.full_graph else None
        captured = _Captured(graph, inputs, outputs, [args[i].data_ptr() for i in self.static_indices], metadata)
        self.graphs[size] = captured
        stats = self.pool.stats
        stats.captured_graphs += 1
        stats.pool_bytes += torch.cuda.memory_allocated() - allocated  # the pool's live buffers
        if size is not None and size not in stats.sizes:
            stats.sizes = tuple(sorted(stats.sizes + (size,)))
        logger.debug("captured CUDA graph for size %s", size)
        return captured

    def _other_weights(self, args: list):
        """Run uncaptured: the graph's weights are not the captured ones. Dynamo runs one graph
        for every module that reaches it the same way (after a graph break inside a repeated
        block each layer passes its own weights), and a replay would read the captured ones."""
        if not self.warned_other_weights:
            self.warned_other_weights = True
            logger.warning("a CUDA graph's weights differ from those it was captured with (one compiled "
                           "graph serves several modules, e.g. after a graph break in a repeated block): "
                           "those calls run without CUDA graphs")
        return call_boxed(self.compiled, args)

    def _replay(self, captured: _Captured, args: list):
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


def _is_uniform_decode() -> bool:
    md = current_forward_context()
    return md is None or md.is_uniform_decode


def _metadata_ptrs() -> tuple[int, ...] | None:
    """Addresses of the current attention metadata tensors (full graphs read them on replay).

    A full graph may only replay with the very buffers it was captured with; callers update
    those buffers in place between steps. Any other metadata runs the compiled code uncaptured."""
    md = current_forward_context()
    if md is None:
        return None
    return (md.slot_mapping.data_ptr(), md.query_start_loc.data_ptr(), md.seq_lens.data_ptr(),
            md.block_tables.data_ptr(), md.max_query_len, md.num_seqs)
