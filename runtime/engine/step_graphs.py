"""The engine's CUDA-graph policy: the mode, the sizes a batch pads to, the static decode buffers
of each size and, in full mode, the captured decode steps (forward and LM head)."""
from __future__ import annotations

import bisect
from typing import Callable

import torch
from torch import Tensor

from ...compiler.cudagraph import CudaGraphPool, CudaGraphWrapper
from ..graphs import GraphStep
from .decode_buffers import DecodeBuffers


class StepGraphs:
    """What CUDA graphs the engine's steps replay (:mod:`infer.runtime.graphs` defines the modes).

    ``"piecewise"``: the backend captures the pieces between attention calls; every step whose
    padded token count is a capture size replays them (the runner says so with a
    :class:`~infer.runtime.graphs.GraphStep`). ``"full"``: the runner captures whole decode steps
    with the LM head on the static :class:`DecodeBuffers` of each size (:attr:`decode`); prefill
    steps run the compiled graph uncaptured. ``"none"``: no graphs, no padding.
    """

    def __init__(self, mode: str, sizes: tuple[int, ...], max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device) -> None:
        self.mode = mode if sizes else "none"
        self.sizes = tuple(sizes) if self.mode != "none" else ()
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_model_len = max_model_len
        self.device = device
        self.buffers: dict[int, DecodeBuffers] = {}
        self.decode: CudaGraphWrapper | None = None  # full mode, once captured: batch size -> step

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def padded_size(self, num_tokens: int) -> int:
        """The next capture size ``>= num_tokens``; ``num_tokens`` itself without graphs or above
        the largest size."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else num_tokens

    def decode_size(self, num_seqs: int, is_prefill: bool) -> int | None:
        """The capture size whose static buffers (and full graph) run a decode step of ``num_seqs``;
        None when the step is not a full-graph decode step."""
        if not self.full or is_prefill:
            return None
        size = self.padded_size(num_seqs)
        return size if size in self.sizes else None

    def backend_step(self, num_padded_tokens: int) -> GraphStep | None:
        """What the backend's piecewise graphs are told about a step of ``num_padded_tokens``."""
        if self.mode != "piecewise":
            return None
        if num_padded_tokens in self.sizes:
            return GraphStep("piecewise", num_padded_tokens)
        return GraphStep("none")

    def decode_buffers(self, size: int) -> DecodeBuffers:
        if size not in self.buffers:
            self.buffers[size] = DecodeBuffers.allocate(size, self.max_blocks_per_seq, self.max_model_len, self.device)
        return self.buffers[size]

    def capture_decode(self, step: Callable[[DecodeBuffers], Tensor], buffers: DecodeBuffers, pool: CudaGraphPool,
                       warmups: int) -> None:
        """Warm ``step(buffers)`` up ``warmups`` times, then capture it as the graph of its size."""
        if self.decode is None:
            self.decode = CudaGraphWrapper(step, "full", pool, boxed=False)
        for _ in range(warmups):
            step(buffers)
        torch.cuda.synchronize()
        self.decode.capture(buffers.size, [buffers])

    def replay_decode(self, size: int | None) -> Tensor | None:
        """The logits of the captured decode step of ``size`` (its static output), or None."""
        if self.decode is None or size not in self.decode:
            return None
        return self.decode.replay(size, [self.buffers[size]])
