"""Runs one scheduled batch through the model: flat inputs, attention metadata, logits, sampling."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..attention import AttentionMetadata
from ..attention.metadata import cdiv, host_to_device
from ..kernels.precompile import parallel_compiles
from ..ops import packed_linear
from .config import EngineConfig
from .decode_buffers import DecodeBuffers
from .forward import ModelForward
from .sampler import sample
from .scheduler import ScheduledBatch, ScheduledSeq
from .startup import PAD_TOKEN_ID, Startup
from .step import LaunchedStep, PendingStep, StepInputs
from .step_graphs import StepGraphs

logger = logging.getLogger(__name__)


def fill_decode_buffers(buffers: DecodeBuffers, entries: list[ScheduledSeq], block_size: int,
                        with_ids: bool = True) -> None:
    """Write a decode batch (one new token per entry) into the static buffers of its padded size;
    ``with_ids=False``: the ids are not on the host yet (a step scheduled ahead)."""
    positions = [e.start for e in entries]
    ids = [e.seq.token_ids[p] for e, p in zip(entries, positions)] if with_ids else None
    buffers.fill(ids, positions, [e.seq.block_table for e in entries], block_size)


class ModelRunner:
    """Turns a :class:`ScheduledBatch` into sampled tokens: :meth:`run` waits for them;
    :meth:`launch` then :meth:`sample_async` leave them on the device with a copy to the host under
    way (async scheduling, see :mod:`.engine_loop`). The model's KV caches must already be bound.

    It is made of three parts: :attr:`forward` (the model's forward, eager or compiled, see
    :class:`~.forward.ModelForward`), :attr:`graphs` (the CUDA-graph policy: padding, static decode
    buffers, captured decode steps, see :class:`~.step_graphs.StepGraphs`) and :attr:`startup`
    (the profile run and the captures, see :class:`~.startup.Startup`).

    Full decode graphs hold attention and the LM head: the runner captures them itself and
    replays them without going through Dynamo, so the backend compiles without graphs.
    """

    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        if config.max_model_len is None:
            raise ValueError("EngineConfig.max_model_len must be resolved (EngineConfig.resolve) before running")
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.block_size = config.block_size
        if self.device.type == "cpu" and config.cpu_packed_weights:
            packed = packed_linear.pack_linear_weights(model)  # the compiled graph's packs: at first use
            logger.info("packed %d linear weights for the CPU's GEMM library", packed)
        options = config.compile_options_dict
        sizes = config.cudagraph_capture_sizes if config.use_cudagraphs else ()
        self.graphs = StepGraphs(options.get("cudagraph_mode", "none"), sizes,
                                 cdiv(config.max_model_len, config.block_size), config.max_model_len, self.device)
        if self.graphs.full:
            options = dict(options, cudagraph_mode="none")
        self.forward = ModelForward(model, config, options)
        # Startup's dry runs (profile run, first decode steps) hand their Triton kernels to this
        # pool, which compiles them side by side; capture_cudagraphs waits for it.
        self.startup = Startup(model, config, self.forward, self.graphs, parallel_compiles(self.device))

    def profile_run(self) -> None:
        self.startup.profile_run()

    def capture_cudagraphs(self) -> float:
        return self.startup.capture_cudagraphs()

    def supports_async(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` may run ahead of the host (async scheduling): a decode step on the
        static buffers of a capture size, whose input ids can be written on the device."""
        return self.graphs.decode_size(len(batch.entries), batch.is_prefill) is not None

    def _prepare_full_graph_decode(self, batch: ScheduledBatch, input_tokens: Tensor | None) -> StepInputs | None:
        """A decode step on the static buffers of its padded size (None: not a full-graph step)."""
        size = self.graphs.decode_size(len(batch.entries), batch.is_prefill)
        if size is None:
            return None
        n = len(batch.entries)
        buffers = self.graphs.decode_buffers(size)
        ahead = batch.input_rows is not None
        fill_decode_buffers(buffers, batch.entries, self.block_size, with_ids=not ahead)
        if ahead:  # the ids were sampled by the step before, still running: copy them in stream order
            # clamped: a row sampled from non-finite logits (-1) fails at its postprocess; until
            # then it must stay a valid id for the embedding
            buffers.input_ids[:n].copy_(input_tokens[self._rows(batch.input_rows)].clamp_min(0))  # [n]
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
                             f"{len(batch.entries)} entries have no capture size in {self.graphs.sizes}")
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
        padded = self.graphs.padded_size(num_tokens)  # piecewise graphs serve prefill and decode alike
        pad = padded - num_tokens
        graph_shapes = bool(self.graphs.sizes)
        metadata = AttentionMetadata.build(
            query_lens, seq_lens, tables, self.block_size, self.device,
            max_blocks_per_seq=self.graphs.max_blocks_per_seq if graph_shapes else None,
            pad_tokens_to=padded if pad else None,
        )
        return StepInputs(
            input_ids=self._tensor(ids + [PAD_TOKEN_ID] * pad),  # [T_pad]
            positions=self._tensor(positions + [0] * pad),  # [T_pad]
            metadata=metadata,
            logits_indices=self._tensor(logits_rows),  # [N]
            num_tokens=num_tokens,
        )

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
        logits = self.graphs.replay_decode(inputs.graph_size)
        if logits is not None:  # every entry of a decode step samples, in row order
            return LaunchedStep(batch, logits=logits[:inputs.num_tokens])  # [N, V]
        step = self.graphs.backend_step(inputs.input_ids.shape[0])
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.metadata, step)  # [T_pad, H]
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
