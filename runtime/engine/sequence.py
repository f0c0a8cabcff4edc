"""One request as the engine sees it: its tokens, its KV blocks and its progress."""
from __future__ import annotations

from collections.abc import Iterable
from enum import Enum, auto

import torch

from .sampling import SamplingParams


class SequenceStatus(Enum):
    """WAITING: holds no KV blocks. RUNNING: holds blocks. FINISHED: done, blocks released."""

    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


FINISH_STOP = "stop"  # an end-of-sequence or stop token was generated
FINISH_LENGTH = "length"  # max_tokens or max_model_len reached
FINISH_ERROR = "error"  # the request can never run; see Sequence.error
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ERROR)


class Sequence:
    """A request's token ids (prompt then generated), KV block table and progress.

    ``num_computed_tokens`` counts the leading tokens whose KV is in the cache. The engine
    computes ``token_ids[num_computed_tokens:]`` next (several steps for a chunked prefill);
    the step that reaches ``num_tokens`` samples one more token. In steady decode exactly one
    token (the last one) is left to compute. A preempted sequence keeps its generated tokens
    and recomputes all of its tokens, generated ones included, as if they were its prompt.

    Attributes:
        request_id: caller's id, only carried along.
        token_ids: prompt ids followed by generated ids.
        num_prompt_tokens: length of the original prompt.
        params: the request's sampling parameters.
        status: see :class:`SequenceStatus`.
        num_computed_tokens: leading tokens whose KV is cached.
        num_cached_tokens: tokens found in the prefix cache at the last allocation.
        block_table: physical KV block ids, block ``i`` holds positions
            ``[i * block_size, (i + 1) * block_size)``.
        finish_reason: one of ``"stop"``, ``"length"``, ``"error"`` once finished.
        error: a message when ``finish_reason == "error"``.
        generator: a CPU ``torch.Generator`` seeded from ``params.seed``, else ``None``.
    """

    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "params", "status", "num_computed_tokens",
        "num_cached_tokens", "block_table", "finish_reason", "error", "generator",
    )

    def __init__(self, request_id: int | str, prompt_token_ids: Iterable[int],
                 params: SamplingParams | None = None) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]
        if not self.token_ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must hold at least 1 token, got 0")
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params if params is not None else SamplingParams()
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated ids, a final stop/end-of-sequence id included."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is still to compute (1 in steady decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a generated token (its KV is computed by the next step)."""
        self.token_ids.append(int(token_id))

    def finish(self, reason: str, error: str | None = None) -> None:
        """Mark the sequence finished; the scheduler releases its blocks."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
