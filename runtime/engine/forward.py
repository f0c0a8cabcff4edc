"""The model's forward as the engine runs it: eager, compiled whole, or compiled stage by stage."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ... import torch_internals as internals
from ...compiler import cache
from ...compiler.config import CompilerConfig
from ...compiler.stages import UNFUSED_STAGES, compile_stages, direct_stages, lookup_stages, store_stages
from ..attention import AttentionMetadata, forward_context
from ..graphs import GraphStep, graph_step
from ..ops import packed_linear
from .config import EngineConfig


def first_of_each_kind(layer_fn):
    """A stage ``layer`` function that runs only the first layer of each kind (class and
    parameter shapes) it meets and passes the stream through the others: for dry steps."""
    seen = set()

    def layer(module: nn.Module, hidden: Tensor, residual: Tensor, *shared):
        kind = (type(module), tuple((name, p.shape, p.dtype) for name, p in module.named_parameters()))
        if kind in seen:
            return hidden, residual
        seen.add(kind)
        return layer_fn(module, hidden, residual, *shared)
    return layer


class ModelForward:
    """``(input_ids [T], positions [T], metadata) -> hidden [T, H]``, run the way chosen at
    construction (:attr:`kind`):

    - ``"eager"``: the model as written.
    - ``"compiled"``: ``torch.compile(model.forward, backend="infer")``, one graph for every ``T``.
    - ``"staged"``: a model with stages (:mod:`infer.models.stages`) compiled stage by stage, one
      graph serving every decoder layer (compiles ~layers times faster). Only where the backend
      captures no per-piece CUDA graphs: those would hold the first layer's weights.

    Compiled, the first call loads the graph from the compile cache or compiles and stores it,
    keyed once the real KV cache is bound (its shape is part of the key) and with this rank's
    tensor-parallel place (baked into the graph's vocab offsets); stage by stage it then calls the
    stage graphs without Dynamo's guards.
    """

    def __init__(self, model: nn.Module, config: EngineConfig, options: dict[str, Any]) -> None:
        self.model = model
        self.options = options
        if not config.compile:
            self.kind = "eager"
        elif config.staged_compile and hasattr(model, "run_stages") \
                and options.get("cudagraph_mode", "none") == "none":
            self.kind = "staged"
        else:
            self.kind = "compiled"
        self.stages = None
        self.compiled = None
        if self.kind == "staged":
            # With the eager inner compiler a stage with nothing to fuse runs as written: its graph
            # would only cost a Dynamo trace and an AOT pass at startup.
            eager = CompilerConfig.from_options(options).inner_compiler == "eager"
            self.stages = compile_stages(model.stages, options, plain=UNFUSED_STAGES if eager else ())
        elif self.kind == "compiled":
            self.compiled = torch.compile(model.forward, backend="infer", options=options)
        # CPU: linears run from oneDNN-packed weights, packed at first use (see ops.packed_linear)
        self.packing = config.device_type == "cpu" and config.cpu_packed_weights
        self.cache_dir = config.resolved_compile_cache_dir
        self._first_call = self.kind != "eager" and (self.cache_dir is not None or self.kind == "staged")

    def __call__(self, input_ids: Tensor, positions: Tensor, metadata: AttentionMetadata,
                 step: GraphStep | None = None) -> Tensor:
        """The hidden states, inside the forward context (and ``step``, told to CUDA-graph wrappers).

        Compiled, dim 0 is unbacked: no 0/1 specialization and no guard on its value (a backed
        one recompiles for ``T == 1``, with either inner compiler)."""
        if self.kind != "eager":
            internals.mark_unbacked(input_ids, 0)
            internals.mark_unbacked(positions, 0)
        told = graph_step(step) if step is not None else contextlib.nullcontext()
        packing = packed_linear.packing() if self.packing else contextlib.nullcontext()
        with forward_context(metadata), told, packing:
            if self._first_call:
                self._first_call = False
                return self._load_or_compile(input_ids, positions)
            return self._run(input_ids, positions)

    def _run(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        if self.kind == "staged":
            return self.model.run_stages(input_ids, positions, self.stages)
        if self.kind == "compiled":
            return self.compiled(input_ids, positions)
        return self.model(input_ids, positions)

    @contextlib.contextmanager
    def first_layer_of_each_kind(self) -> Iterator[None]:
        """Stage by stage, run only the first layer of each kind inside the block (dry steps:
        the other layers would launch the same kernels)."""
        if self.kind != "staged":
            yield
            return
        stages = self.stages
        self.stages = stages._replace(layer=first_of_each_kind(stages.layer))
        try:
            yield
        finally:
            self.stages = stages

    def _load_or_compile(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        from .. import distributed
        key = cache.cache_key(self.model, self.options,
                              extra=f"tp {distributed.tp_rank()}/{distributed.tp_size()} staged {self.kind == 'staged'}")
        if self.kind == "staged":
            return self._load_or_compile_stages(key, input_ids, positions)
        loaded = cache.lookup(self.cache_dir, key, self.model)
        if loaded is not None:
            self.compiled = loaded
            return self._run(input_ids, positions)
        with cache.recording() as rec:
            out = self._run(input_ids, positions)
        cache.store(self.cache_dir, key, rec, self.model.forward, out)
        return out

    def _load_or_compile_stages(self, key: str, input_ids: Tensor, positions: Tensor) -> Tensor:
        loaded = None if self.cache_dir is None else lookup_stages(self.cache_dir, key, self.model.stages)
        if loaded is not None:
            self.stages = loaded
            return self._run(input_ids, positions)
        with cache.recording() as rec:
            out = self._run(input_ids, positions)
        if self.cache_dir is not None:
            store_stages(self.cache_dir, key, rec, self.stages)
        self.stages = direct_stages(rec, self.stages) or self.stages  # no guards per call from now on
        return out
