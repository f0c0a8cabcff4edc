"""What the engine runs once, at startup: the profile run that sizes the KV cache, the dry decode
steps that name every Triton kernel for the compile pool (:mod:`..kernels.precompile`), and the
capture of the decode graphs."""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import Tensor, nn

from ...compiler.cudagraph import CudaGraphPool
from ..attention import AttentionMetadata, forward_context
from ..attention.metadata import cdiv, host_to_device
from .config import EngineConfig
from .decode_buffers import DecodeBuffers
from .forward import ModelForward, first_of_each_kind
from .kv_cache import attention_layers, bind_kv_cache, release_kv_cache
from .sampler import sample
from .sampling import SamplingParams
from .step_graphs import StepGraphs

logger = logging.getLogger(__name__)

PAD_TOKEN_ID = 0  # input id of a padding token (its KV slot is -1, its output is ignored)
PROFILE_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9)  # the costliest sampling path


def profile_forward(model: nn.Module, input_ids: Tensor, positions: Tensor) -> Tensor:
    """The eager forward of the profile run. With stages, only the first layer of each kind runs:
    a layer's activations are freed before the next layer runs, and a layer of the same kind
    allocates the same again, so the peak is the same as the whole stack's (an 8B model runs 1
    layer of 36). Its output values differ, and the profile run never reads them."""
    if not hasattr(model, "run_stages"):
        return model(input_ids, positions)
    stages = model.stages
    return model.run_stages(input_ids, positions, stages._replace(layer=first_of_each_kind(stages.layer)))


def decode_step(model: nn.Module, forward: ModelForward, buffers: DecodeBuffers) -> Tensor:
    """One decode step on static buffers, LM head included: ``[size, V]`` logits."""
    hidden = forward(buffers.input_ids, buffers.positions, buffers.metadata)  # [B, H]
    return model.compute_logits(hidden)  # [B, V]


class Startup:
    """The startup steps of one engine: the model, its forward, its CUDA-graph policy and the
    pool that compiles Triton kernels side by side (None: kernels compile where they first run)."""

    def __init__(self, model: nn.Module, config: EngineConfig, forward: ModelForward, graphs: StepGraphs,
                 compiles) -> None:
        self.model = model
        self.config = config
        self.forward = forward
        self.graphs = graphs
        self.compiles = compiles
        self.device = graphs.device
        self.block_size = config.block_size

    @torch.inference_mode()
    def capture_cudagraphs(self) -> float:
        """Warm up and capture every capture size, largest first (one shared pool); returns seconds.
        Closes the compile pool (waiting for any compile still running).

        The dummy steps are all padding: no sequence, every slot -1, so no KV is written."""
        compiles, self.compiles = self.compiles, None
        try:
            return self._capture(compiles)
        finally:
            if compiles is not None:
                compiles.close()

    def _capture(self, compiles) -> float:
        graphs = self.graphs
        if self.forward.kind == "eager" or graphs.mode == "none":
            return 0.0
        start = time.perf_counter()
        pool = CudaGraphPool()  # shared by every size, captured largest first
        sizes = sorted(graphs.sizes, reverse=True)
        warmups = 2  # compile (first size only), then the kernels' first launches
        if compiles is not None:
            if graphs.full:
                with compiles.deferring():  # dry steps name the decode kernels; the pool compiles them
                    self._dry_decode_steps(sizes)
            compiles.wait()
            if graphs.full and not compiles.failed:
                warmups = 0  # every kernel compiled and loaded by the pool, every torch op run once
        for size in sizes:
            if graphs.full:
                graphs.capture_decode(self.decode_step, self._cleared_buffers(size), pool, warmups)
                continue
            metadata = AttentionMetadata.build([], [], [], self.block_size, self.device,
                                               max_blocks_per_seq=graphs.max_blocks_per_seq, pad_tokens_to=size)
            ids = torch.full((size,), PAD_TOKEN_ID, dtype=torch.int64, device=self.device)  # [size]
            positions = torch.zeros(size, dtype=torch.int64, device=self.device)  # [size]
            for _ in range(2):  # warm-up, then the backend captures each piece
                self.forward(ids, positions, metadata, graphs.backend_step(size))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info("captured CUDA graphs for %d sizes in %.1fs", len(sizes), seconds)
        return seconds

    def decode_step(self, buffers: DecodeBuffers) -> Tensor:
        return decode_step(self.model, self.forward, buffers)

    def _dry_decode_steps(self, sizes: list[int]) -> None:
        """One dry decode step per size, smallest first (the GEMV variants, the slowest compiles,
        go to the pool first). The first step compiles the model; after it, stage by stage, only
        the first layer of each kind runs: the others would launch the same kernel variants."""
        start = time.perf_counter()
        for i, size in enumerate(sorted(sizes)):
            dry = self.forward.first_layer_of_each_kind() if i else contextlib.nullcontext()
            with dry:
                self.decode_step(self._cleared_buffers(size))
        logger.info("dry decode steps for %d sizes in %.2fs", len(sizes), time.perf_counter() - start)

    def _cleared_buffers(self, size: int) -> DecodeBuffers:
        buffers = self.graphs.decode_buffers(size)
        buffers.clear()
        return buffers

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward at ``max_num_batched_tokens`` tokens and sampling of ``max_num_seqs`` rows.

        Binds a temporary KV cache just large enough for the dummy batch and releases it after.
        The forward is eager: a graph compiled here would guard on that cache (its block count,
        and that it is an inference tensor) and the first real step would compile another. Eager
        activations are no smaller than the compiled graph's, whose fusions only remove some.
        It runs one layer of each kind (:func:`profile_forward`): the peak is the same.
        With a compile pool (CUDA) the run is dry: its Triton kernels are handed to the pool, not
        launched. It allocates just the same (a skipped kernel's outputs exist all the same); its
        values, never read, are garbage.
        """
        config = self.config
        total, max_len = config.max_num_batched_tokens, config.max_model_len
        lens = [max_len] * (total // max_len) + ([total % max_len] if total % max_len else [])
        tables, next_block = [], 0
        for n in lens:
            tables.append(list(range(next_block, next_block + cdiv(n, self.block_size))))
            next_block += len(tables[-1])
        layers = attention_layers(self.model)
        dtype = next(self.model.parameters()).dtype
        bind_kv_cache(layers, next_block, self.block_size, dtype, self.device)
        try:
            metadata = AttentionMetadata.build(lens, lens, tables, self.block_size, self.device)
            ids = torch.full((total,), PAD_TOKEN_ID, dtype=torch.int64, device=self.device)  # [T]
            positions = host_to_device([p for n in lens for p in range(n)], torch.int64, self.device)  # [T]
            dry = self.compiles.deferring() if self.compiles is not None else contextlib.nullcontext()
            with forward_context(metadata), dry:
                hidden = profile_forward(self.model, ids, positions)  # [T, H], eager (see above)
                rows = min(config.max_num_seqs, total)
                logits = self.model.compute_logits(hidden[-rows:])  # [rows, V]
                sample(logits, [PROFILE_SAMPLING] * rows)
        finally:
            release_kv_cache(layers)
        logger.info("profile run: %d tokens in %d sequences", total, len(lens))
