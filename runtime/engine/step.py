"""One engine step on the device: its inputs and the step in flight.

A synchronous step goes prepare -> forward -> sample -> tokens to the host. With async
scheduling a decode step is split: :class:`LaunchedStep` (forward queued, sampling still to
come) and :class:`PendingStep` (sampled, the token ids on their way to the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import AttentionMetadata
from .scheduler import ScheduledBatch


@dataclass(frozen=True, slots=True)
class StepInputs:
    """Device inputs of one forward step.

    Attributes:
        input_ids: ``[T_pad] int64`` new tokens of every entry, then padding.
        positions: ``[T_pad] int64`` their positions.
        metadata: paged-attention metadata (padding tokens have slot -1).
        logits_indices: ``[N] int64`` rows of the hidden states that sample (last token of each
            sampling entry, in entry order).
        num_tokens: real (unpadded) token count.
        graph_size: the captured decode graph these (static) inputs feed, if any.
    """

    input_ids: Tensor
    positions: Tensor
    metadata: AttentionMetadata
    logits_indices: Tensor
    num_tokens: int
    graph_size: int | None = None


@dataclass(slots=True)
class LaunchedStep:
    """A step whose forward is queued on the device; its sampling is still to launch.

    Attributes:
        batch: the scheduled step.
        logits: ``[N, V]`` logits of the sampling entries when a graph computed the LM head (a
            view of the graph's static output: sample before the next replay), else None.
        hidden: ``[T_pad, H]`` hidden states when the LM head is still to run, else None.
        logits_indices: ``[N]`` rows of ``hidden`` that sample (with ``hidden``).
    """

    batch: ScheduledBatch
    logits: Tensor | None = None
    hidden: Tensor | None = None
    logits_indices: Tensor | None = None


@dataclass(slots=True)
class PendingStep:
    """A sampled decode step whose token ids are being copied to the host.

    Attributes:
        batch: the entries that sampled, in token order (what :meth:`Scheduler.postprocess` takes).
        tokens: ``[N] int64`` the sampled ids on the device: the next step's input ids.
        host_tokens: ``[N] int64`` on the CPU (pinned on CUDA), written by a non-blocking copy.
        copied: recorded after that copy (None on CPU, where there is nothing to wait for).
    """

    batch: ScheduledBatch
    tokens: Tensor
    host_tokens: Tensor
    copied: torch.cuda.Event | None

    @classmethod
    def start(cls, batch: ScheduledBatch, tokens: Tensor) -> "PendingStep":
        """Queue the copy of ``tokens`` to the host behind the work that computes them."""
        if tokens.device.type != "cuda":
            return cls(batch, tokens, tokens, None)
        host = tokens.to("cpu", non_blocking=True)  # pinned destination
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(tokens.device))
        return cls(batch, tokens, host, copied)

    def token_ids(self) -> list[int]:
        """The sampled ids; blocks until the device has produced and copied them."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_tokens.tolist()
