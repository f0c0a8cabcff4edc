"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each :meth:`Scheduler.schedule` call builds one batch, either a *prefill* batch or a *decode*
batch:

* prefill first: sequences in the middle of a chunked prefill continue, then waiting sequences
  are admitted in FIFO order while the token budget (``max_num_batched_tokens``), the sequence
  cap (``max_num_seqs``) and free KV blocks allow. A prompt longer than the remaining budget
  is split over several steps when ``enable_chunked_prefill`` is set.
* otherwise decode: every running sequence computes its last token and samples the next one.
  When the KV blocks run out, the most recently admitted running sequence is preempted: its
  blocks are freed and it goes back to the front of the waiting queue; its generated tokens are
  kept and recomputed with the prompt when it is admitted again.

With async scheduling, :meth:`Scheduler.schedule_ahead` builds the decode step that follows a
decode step whose sampled tokens are still on the device, when that step is exactly what
:meth:`Scheduler.schedule` would build after the postprocess, short of the rows of sequences
that turn out to stop on their token (their results are then ignored).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .sequence import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Sequence, SequenceStatus

logger = logging.getLogger(__name__)

NON_FINITE = "non-finite logits"  # a stop reason of the scheduler's own: the request fails


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching limits.

    Attributes:
        max_num_seqs: the most sequences running (holding KV blocks) at once.
        max_num_batched_tokens: the most new tokens computed in one step.
        max_model_len: the most tokens (prompt plus output) in a sequence.
        enable_chunked_prefill: split prompts longer than the step's token budget over several
            steps; without it ``max_num_batched_tokens`` must be ``>= max_model_len``.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (a decode step computes one token per sequence)")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens={self.max_num_batched_tokens} "
                             f"must be >= max_model_len={self.max_model_len}")


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: compute tokens ``[start, start + num_new_tokens)``.

    ``sample`` is False for a chunk that ends before the sequence's last token (a chunked prefill
    in progress): its logits are not needed and it gets no new token. Read-only once scheduled
    (not frozen only because a frozen dataclass costs 3x more to build, 256 times a step).
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def token_ids(self) -> list[int]:
        """Input ids of this step, at positions ``start..end-1``."""
        return self.seq.token_ids[self.start:self.end]


@dataclass(slots=True)
class ScheduledBatch:
    """What to run in one step.

    Attributes:
        entries: scheduled sequences in batch order.
        is_prefill: True for a prefill batch (any chunk lengths, cached context possible),
            False for a decode batch (every entry computes exactly one token and samples).
        finished: sequences the scheduler finished outside :meth:`Scheduler.postprocess` since
            the previous batch (requests that can never fit, ``finish_reason == "error"``).
        input_rows: for a step scheduled ahead, the row of the previous step's sampled tokens
            that is each entry's input id (not yet in ``seq.token_ids``); None when the input
            ids are known on the host.
    """

    entries: list[ScheduledSeq]
    is_prefill: bool
    finished: list[Sequence] = field(default_factory=list)
    input_rows: list[int] | None = None

    @property
    def seqs(self) -> list[Sequence]:
        return [e.seq for e in self.entries]

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    @property
    def sample_indices(self) -> list[int]:
        """Indices of the entries that sample a token, in order."""
        return [i for i, e in enumerate(self.entries) if e.sample]

    @property
    def is_empty(self) -> bool:
        return not self.entries


class Scheduler:
    """Decides which sequences run each step and applies the sampled tokens.

    Args:
        config: batching limits.
        block_manager: the KV block allocator (its size is known only at run time).
        eos_token_ids: ids that finish a sequence unless its params say ``ignore_eos``.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: Iterable[int]) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_ahead_steps = 0  # steps built by schedule_ahead
        self._failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; one that can never run is finished at once with an error."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} must be new (WAITING, no blocks), got {seq!r}")
        reason = self._unfit_reason(seq)
        if reason is not None:
            self._fail(seq, reason)
            return
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        """True when no sequence is waiting or running."""
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        """Build the next batch: a prefill batch when there is prefill work that fits, else decode.

        The batch may be empty (nothing runnable, e.g. every request failed); check
        ``batch.is_empty`` and ``batch.finished``.
        """
        entries = self._schedule_prefill()
        is_prefill = bool(entries)
        if not is_prefill:
            entries = self._schedule_decode()
        failed, self._failed = self._failed, []
        return ScheduledBatch(entries, is_prefill, failed)

    def schedule_ahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after ``prev`` while ``prev``'s sampled tokens are still unknown.

        ``prev`` is the decode step in flight: its entries are the running sequences, in order,
        and it is not postprocessed yet. Each of them that will not reach its length limit with
        its pending token computes that token next, at position ``len(seq.token_ids)``; one that
        stops on it (end-of-sequence or stop id) is computed once more for nothing. Returns None,
        changing nothing, when the next step can only be decided after the postprocess: a
        waiting sequence may be admitted (a slot may free up), a request failed, the blocks
        would not suffice for all (a preemption), or every sequence finishes.
        """
        if self._failed or prev.is_prefill or len(prev.entries) != len(self.running):
            return None
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, entry in enumerate(prev.entries):
            seq = entry.seq
            if not self._reaches_length(seq, len(seq.token_ids) + 1):
                rows.append(row)
                seqs.append(seq)
        if self.waiting and not self._stays_full(seqs):
            return None
        if not seqs or not self.block_manager.may_append_all(seqs, num_pending=1):
            return None
        self.num_ahead_steps += 1
        entries = [ScheduledSeq(seq, len(seq.token_ids), 1, True) for seq in seqs]
        return ScheduledBatch(entries, False, input_rows=rows)

    def _stays_full(self, seqs: list[Sequence]) -> bool:
        """Whether ``seqs``, the running sequences that do not finish by length, fill every slot
        and none can stop on a token: then no waiting sequence can be admitted next step."""
        return len(seqs) >= self.config.max_num_seqs and all(
            seq.params.ignore_eos and not seq.params.stop_token_ids for seq in seqs)

    def postprocess(self, batch: ScheduledBatch, sampled_token_ids: torch.Tensor | SequenceABC[int]) -> list[Sequence]:
        """Record a finished step: advance KV progress, append sampled tokens, finish sequences.

        ``sampled_token_ids`` holds one id per sampling entry (``batch.sample_indices`` order) or
        one id per entry (ids of non-sampling entries are ignored). Returns the sequences this
        step finished; their blocks are already released.
        """
        tokens = sampled_token_ids.tolist() if isinstance(sampled_token_ids, torch.Tensor) else list(sampled_token_ids)
        if not batch.is_prefill and len(tokens) == len(batch.entries):
            return self._postprocess_decode(batch.entries, tokens)
        sample_indices = batch.sample_indices
        if len(tokens) == len(batch.entries):
            tokens = [tokens[i] for i in sample_indices]
        elif len(tokens) != len(sample_indices):
            raise ValueError(f"got {len(tokens)} sampled token ids; the batch has {len(batch.entries)} entries, "
                             f"{len(sample_indices)} of which sample")
        token_iter = iter(tokens)
        stopped: list[tuple[Sequence, str]] = []
        for entry in batch.entries:
            seq = entry.seq
            seq.num_computed_tokens = entry.end
            token = int(next(token_iter)) if entry.sample else None
            if token is not None and token < 0:  # its KV may be as bad as its logits: not cached
                stopped.append((seq, NON_FINITE))
                continue
            self.block_manager.commit(seq, entry.start)
            if token is None:
                continue
            seq.append_token(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                stopped.append((seq, reason))
        return self._retire(stopped)

    def _postprocess_decode(self, entries: list[ScheduledSeq], tokens: list[int]) -> list[Sequence]:
        """:meth:`postprocess` of a decode batch: every entry computed one token and samples."""
        seqs = [entry.seq for entry in entries]
        stopped: list[tuple[Sequence, str]] = []
        for entry, seq, token in zip(entries, seqs, tokens):
            token = int(token)
            seq.num_computed_tokens = entry.start + 1
            if token < 0:
                stopped.append((seq, NON_FINITE))
                continue
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                stopped.append((seq, reason))
        failed = {id(seq) for seq, reason in stopped if reason is NON_FINITE}
        self.block_manager.commit_decode([seq for seq in seqs if id(seq) not in failed] if failed else seqs)
        return self._retire(stopped)

    def _retire(self, stopped: list[tuple[Sequence, str]]) -> list[Sequence]:
        """Finish the stopped sequences, free their blocks and drop them from the running list."""
        for seq, reason in stopped:
            if reason is NON_FINITE:
                seq.finish(FINISH_ERROR, "the model's logits are not finite (NaN or Inf) at this step")
                logger.warning("request %r failed: non-finite logits", seq.request_id)
            else:
                seq.finish(reason)
            self.block_manager.deallocate(seq)
        if stopped:
            self.running = [s for s in self.running if not s.is_finished]
        return [seq for seq, _ in stopped]

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        entries: list[ScheduledSeq] = []
        for seq in self.running:  # chunked prefills in progress
            if len(seq.token_ids) - seq.num_computed_tokens > 1 and budget > 0:
                entries.append(self._entry(seq, budget))
                budget -= entries[-1].num_new_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            reason = self._unfit_reason(seq)
            if reason is not None:
                self.waiting.popleft()
                self._fail(seq, reason)
                continue
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break  # conservative: ignores prefix-cache hits
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entries.append(self._entry(seq, budget))
            budget -= entries[-1].num_new_tokens
        return entries

    def _schedule_decode(self) -> list[ScheduledSeq]:
        if self.block_manager.may_append_all(self.running):  # nothing to preempt
            return [ScheduledSeq(seq, seq.num_computed_tokens, 1, True) for seq in self.running]
        queue = deque(self.running)
        scheduled: list[Sequence] = []
        while queue:
            seq: Sequence | None = queue.popleft()
            while not self.block_manager.can_append(seq):
                if queue:
                    self._preempt(queue.pop())
                    continue
                if scheduled:
                    self._preempt(seq)
                else:
                    self._fail(seq, self._unfit_reason(seq, growing=True))
                seq = None
                break
            if seq is not None:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running = scheduled
        return [self._entry(seq, 1) for seq in scheduled]

    def _entry(self, seq: Sequence, budget: int) -> ScheduledSeq:
        n = min(seq.num_uncomputed_tokens, budget)
        return ScheduledSeq(seq, seq.num_computed_tokens, n, seq.num_computed_tokens + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it at the front of the waiting queue."""
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %r (%d preemptions so far)", seq, self.num_preemptions)

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.block_table:
            self.block_manager.deallocate(seq)
        seq.finish(FINISH_ERROR, message)
        self._failed.append(seq)
        logger.warning("request %r failed: %s", seq.request_id, message)

    def _unfit_reason(self, seq: Sequence, growing: bool = False) -> str | None:
        """Why ``seq`` can never run (``growing``: cannot add its next block), else None."""
        if seq.num_tokens > self.config.max_model_len:
            return f"prompt has {seq.num_tokens} tokens, more than max_model_len={self.config.max_model_len}"
        bm = self.block_manager
        needed = bm.num_blocks_needed(seq.num_tokens)
        if growing or needed > bm.num_blocks:
            return (f"sequence needs {needed} KV blocks of {bm.block_size} tokens for {seq.num_tokens} tokens, "
                    f"only {bm.num_blocks} exist")
        return None

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FINISH_STOP
        return FINISH_LENGTH if self._reaches_length(seq, len(seq.token_ids)) else None

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` finishes by length once it holds ``num_tokens`` tokens."""
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.config.max_model_len
