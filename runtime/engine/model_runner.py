"""Runs one scheduled batch through the model: flat inputs, attention metadata, logits, sampling."""
from __future__ import annotations

import bisect
import logging

import torch
from torch import Tensor, nn

from ... import torch_internals as internals
from ...compiler.config import CompilerConfig
from ...compiler.stages import UNFUSED_STAGES, compile_stages, direct_stages, lookup_stages, store_stages
from ..attention import AttentionMetadata, forward_context
from ..attention.metadata import host_to_device
from ..kernels.precompile import parallel_compiles
from .config import EngineConfig
from .decode_buffers import DecodeBuffers
from .sampler import sample
from .scheduler import ScheduledBatch, ScheduledSeq
from ..attention.metadata import cdiv
from .startup_steps import PAD_TOKEN_ID, StartupSteps
from .step import LaunchedStep, PendingStep, StepGraph, StepInputs

logger = logging.getLogger(__name__)


def fill_decode_buffers(buffers: DecodeBuffers, entries: list[ScheduledSeq], block_size: int,
                        with_ids: bool = True) -> None:
    """Write a decode batch (one new token per entry) into the static buffers of its padded size;
    ``with_ids=False``: the ids are not on the host yet (a step scheduled ahead)."""
    positions = [e.start for e in entries]
    ids = [e.seq.token_ids[p] for e, p in zip(entries, positions)] if with_ids else None
    buffers.fill(ids, positions, [e.seq.block_table for e in entries], block_size)


class ModelRunner(StartupSteps):
    """Holds the model (compiled or not) and turns a :class:`ScheduledBatch` into sampled tokens:
    :meth:`run` waits for them; :meth:`launch` then :meth:`sample_async` leave them on the device
    with a copy to the host under way (async scheduling, see :mod:`.engine_loop`).

    A decode batch runs at :meth:`_padded_size` tokens: the next CUDA-graph capture size when
    CUDA graphs are on, else its own size. The model's KV caches must already be bound.
    """

    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        if config.max_model_len is None:
            raise ValueError("EngineConfig.max_model_len must be resolved (EngineConfig.resolve) before running")
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.block_size = config.block_size
        self.capture_sizes = config.cudagraph_capture_sizes if config.use_cudagraphs else ()
        self.max_blocks_per_seq = cdiv(config.max_model_len, config.block_size)
        self.compiled = config.compile
        self._forward = model.forward
        options = config.compile_options_dict
        # Full graphs hold attention too: decode steps then run on static per-size buffers. The
        # runner captures them itself, LM head included, and replays them without going through
        # Dynamo; the backend compiles without graphs (prefill runs the compiled code as is).
        self.full_graph = bool(self.capture_sizes) and options.get("cudagraph_mode") == "full"
        if self.full_graph:
            options = dict(options, cudagraph_mode="none")
        # Stage by stage: one graph for every decoder layer (compiles ~layers times faster); only
        # where no per-piece graphs are captured, as those would hold the first layer's weights.
        self.staged = (config.compile and config.staged_compile and hasattr(model, "run_stages")
                       and options.get("cudagraph_mode", "none") == "none")
        if self.staged:
            # With the eager inner compiler a stage with nothing to fuse runs as written: its graph
            # would only cost a Dynamo trace and an AOT pass at startup.
            eager = CompilerConfig.from_options(options).inner_compiler == "eager"
            self._stages = compile_stages(model.stages, options, plain=UNFUSED_STAGES if eager else ())
            self._forward = self._staged_forward
        elif config.compile:
            self._forward = torch.compile(model.forward, backend="infer", options=options)
        self._compile_options = options
        self._cache_dir = config.resolved_compile_cache_dir
        # The first compiled call loads from (or stores to) the compile cache; staged, it also
        # switches to calling the stage graphs without Dynamo's guards.
        self._cache_pending = config.compile and (self._cache_dir is not None or self.staged)
        self.decode_buffers: dict[int, DecodeBuffers] = {}
        self.decode_graphs: dict[int, StepGraph] = {}
        # Startup's dry runs (profile run, first decode steps) hand their Triton kernels to this
        # pool, which compiles them side by side; capture_cudagraphs waits for it.
        self._compiles = parallel_compiles(self.device)

    def _padded_size(self, num_tokens: int) -> int:
        """Token count a decode batch of ``num_tokens`` runs at (CUDA-graph hook).

        The next capture size ``>= num_tokens`` when CUDA graphs are on; ``num_tokens`` itself
        otherwise or above the largest capture size.
        """
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else num_tokens

    def _buffers(self, size: int) -> DecodeBuffers:
        if size not in self.decode_buffers:
            self.decode_buffers[size] = DecodeBuffers.allocate(
                size, self.max_blocks_per_seq, self.config.max_model_len, self.device)
        return self.decode_buffers[size]

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        """The capture size whose static buffers (and full graph) run ``batch``; None when it is
        not a full-graph decode step."""
        if not self.full_graph or batch.is_prefill:
            return None
        size = self._padded_size(len(batch.entries))
        return size if size in self.capture_sizes else None

    def supports_async(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` may run ahead of the host (async scheduling): a decode step on the
        static buffers of a capture size, whose input ids can be written on the device."""
        return self._graph_size(batch) is not None

    def _prepare_full_graph_decode(self, batch: ScheduledBatch, input_tokens: Tensor | None) -> StepInputs | None:
        """A decode step on the static buffers of its padded size (None: not a full-graph step)."""
        size = self._graph_size(batch)
        if size is None:
            return None
        n = len(batch.entries)
        buffers = self._buffers(size)
        ahead = batch.input_rows is not None
        fill_decode_buffers(buffers, batch.entries, self.block_size, with_ids=not ahead)
        if ahead:  # the ids were sampled by the step before, still running: copy them in stream order
            buffers.input_ids[:n].copy_(input_tokens[self._rows(batch.input_rows)])  # [n]
        return StepInputs(buffers.input_ids, buffers.positions, buffers.metadata, buffers.rows[:n], n, size)

    def prepare(self, batch: ScheduledBatch, input_tokens: Tensor | None = None) -> StepInputs:
        """Flatten the batch: ids and positions ``start..end-1`` per entry, metadata, logits rows.

        ``input_tokens``: for a batch scheduled ahead (``batch.input_rows``), the previous step's
        sampled ids on the device.
        """
        if (batch.input_rows is not None) != (input_tokens is not None):
            raise ValueError("input_tokens must be given exactly for a batch scheduled ahead (batch.input_rows)")
        inputs = self._prepare_full_graph_decode(batch, input_tokens)
        if inputs is not None:
            return inputs
        if input_tokens is not None:
            raise ValueError(f"a batch scheduled ahead must run on captured decode buffers; "
                             f"{len(batch.entries)} entries have no capture size in {self.capture_sizes}")
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        for entry in batch.entries:
            ids += entry.token_ids
            positions += range(entry.start, entry.end)
            query_lens.append(entry.num_new_tokens)
            seq_lens.append(entry.end)
            tables.append(entry.seq.block_table)
            if entry.sample:
                logits_rows.append(len(ids) - 1)
        num_tokens = len(ids)
        padded = self._padded_size(num_tokens)  # piecewise graphs serve prefill and decode alike
        pad = padded - num_tokens
        graph_shapes = bool(self.capture_sizes)
        metadata = AttentionMetadata.build(
            query_lens, seq_lens, tables, self.block_size, self.device,
            max_blocks_per_seq=self.max_blocks_per_seq if graph_shapes else None,
            pad_tokens_to=padded if pad else None,
        )
        return StepInputs(
            input_ids=self._tensor(ids + [PAD_TOKEN_ID] * pad),  # [T_pad]
            positions=self._tensor(positions + [0] * pad),  # [T_pad]
            metadata=metadata,
            logits_indices=self._tensor(logits_rows),  # [N]
            num_tokens=num_tokens,
        )

    def forward(self, input_ids: Tensor, positions: Tensor, metadata: AttentionMetadata) -> Tensor:
        """``input_ids [T], positions [T] -> hidden [T, H]`` inside the forward context.

        Compiled, one graph serves every ``T``: an unbacked dim 0 has no 0/1 specialization and
        no guard on its value (a backed one recompiles for ``T == 1``, with either inner compiler).
        """
        if self.compiled:
            internals.mark_unbacked(input_ids, 0)
            internals.mark_unbacked(positions, 0)
        with forward_context(metadata):
            if self._cache_pending:
                return self._first_compiled_forward(input_ids, positions)
            return self._forward(input_ids, positions)

    def _staged_forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.run_stages(input_ids, positions, self._stages)

    def _first_compiled_forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Load the compiled graph from the compile cache, or compile it and store it there.

        Keyed at the first compiled call, once the real KV cache is bound (its shape is part of
        the key), with this rank's tensor-parallel place (baked into the graph's vocab offsets)."""
        from ...compiler import cache
        from .. import distributed
        self._cache_pending = False
        key = cache.cache_key(self.model, self._compile_options,
                              extra=f"tp {distributed.tp_rank()}/{distributed.tp_size()} staged {self.staged}")
        if self.staged:
            return self._first_staged_forward(key, input_ids, positions)
        loaded = cache.lookup(self._cache_dir, key, self.model)
        if loaded is not None:
            self._forward = loaded
            return self._forward(input_ids, positions)
        with cache.recording() as rec:
            out = self._forward(input_ids, positions)
        cache.store(self._cache_dir, key, rec, self.model.forward, out)
        return out

    def _first_staged_forward(self, key: str, input_ids: Tensor, positions: Tensor) -> Tensor:
        from ...compiler import cache
        loaded = None if self._cache_dir is None else lookup_stages(self._cache_dir, key, self.model.stages)
        if loaded is not None:
            self._stages = loaded
            return self._forward(input_ids, positions)
        with cache.recording() as rec:
            out = self._forward(input_ids, positions)
        if self._cache_dir is not None:
            store_stages(self._cache_dir, key, rec, self._stages)
        self._stages = direct_stages(rec, self._stages) or self._stages  # no guards per call from now on
        return out

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> Tensor:
        """Run one step; returns ``[N] int64`` CPU token ids, one per sampling entry in order."""
        launched = self.launch(batch)
        if not any(entry.sample for entry in batch.entries):
            return torch.empty(0, dtype=torch.int64)
        return self._sample(launched).cpu()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, input_tokens: Tensor | None = None) -> LaunchedStep:
        """Prepare a step and queue its forward (with the LM head when a graph replays); nothing
        waits for the device. ``input_tokens``: see :meth:`prepare`."""
        inputs = self.prepare(batch, input_tokens)
        graph = self.decode_graphs.get(inputs.graph_size)
        if graph is not None:  # every entry of a decode step samples, in row order
            return LaunchedStep(batch, logits=graph.replay()[:inputs.num_tokens])  # [N, V]
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.metadata)  # [T_pad, H]
        return LaunchedStep(batch, hidden=hidden, logits_indices=inputs.logits_indices)

    @torch.inference_mode()
    def sample_async(self, launched: LaunchedStep, rows: list[int] | None = None) -> PendingStep | None:
        """Sample the entries ``rows`` (None: all) of a launched decode step and queue the copy of
        their tokens to the host; nothing waits for the device. None when ``rows`` is empty."""
        batch = launched.batch
        if rows is not None:
            batch = ScheduledBatch([batch.entries[i] for i in rows], is_prefill=False)
        if not batch.entries:
            return None
        return PendingStep.start(batch, self._sample(launched, rows))

    def _sample(self, launched: LaunchedStep, rows: list[int] | None = None) -> Tensor:
        """``[R] int64`` device tokens of the sampling entries ``rows`` (None: all), in order."""
        seqs = [entry.seq for entry in launched.batch.entries if entry.sample]
        index = None
        if rows is not None:
            seqs = [seqs[i] for i in rows]
            index = self._rows(rows)
        logits = launched.logits
        if logits is None:
            indices = launched.logits_indices if index is None else launched.logits_indices[index]
            logits = self.model.compute_logits(launched.hidden[indices])  # [R, V]
        elif index is not None:
            logits = logits[index]  # [R, V]
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])  # [R]

    def _rows(self, rows: list[int]) -> slice | Tensor:
        """An index of ``rows`` (increasing) for a device tensor, without a host-device sync:
        a slice for a leading run, else a copy from pinned memory queued on the stream."""
        if not rows or rows[-1] == len(rows) - 1:
            return slice(0, len(rows))
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")  # [R]
        return index.to(self.device, non_blocking=True)

    def _tensor(self, values: list[int]) -> Tensor:
        return host_to_device(values, torch.int64, self.device)
