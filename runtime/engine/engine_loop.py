"""The engine loop: schedule, run, postprocess, until every queued sequence finished.

Synchronous, a step is schedule -> prepare -> forward -> sample -> wait for the tokens ->
postprocess, and the device idles while the host schedules, prepares and postprocesses.

With async scheduling a decode step that runs on captured static buffers is launched without
waiting for its tokens. While it runs, the host schedules the next step ahead
(:meth:`Scheduler.schedule_ahead`: every running sequence continues unless its pending token
reaches its length limit), prepares it with input ids gathered on the device from the running
step's tokens, and launches its forward; only then does it wait for the running step's tokens
and postprocess them. The new step samples after that postprocess, only the rows of sequences
that did not stop, so the sampler sees the batches, and draws its random numbers in the order,
of the synchronous loop. A sequence that stopped was computed once more for nothing; its blocks
are freed by that postprocess, after the forward that writes them was queued, so any later use
of them comes after it in stream order. Whenever the next step cannot be decided before the
postprocess (prefill, admission, preemption, a failed request), the loop drains: it postprocesses
the step in flight and goes on synchronously.
"""
from __future__ import annotations

from collections.abc import Iterator

from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence
from .step import PendingStep


class EngineLoop:
    """Drives a :class:`Scheduler` and a :class:`ModelRunner` (or any object with its ``run``,
    ``supports_async``, ``launch`` and ``sample_async``).

    Args:
        scheduler: holds the queued and running sequences.
        runner: runs steps on the device.
        async_scheduling: launch each decode step before postprocessing the one before, where
            the runner supports it (see the module docstring).
    """

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, async_scheduling: bool) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.async_scheduling = async_scheduling
        self.pending: PendingStep | None = None  # the decode step in flight (async scheduling)

    def run(self) -> Iterator[Sequence]:
        """Run until the scheduler is empty, yielding each sequence as it finishes."""
        while not self.is_idle():
            yield from self.step()

    def is_idle(self) -> bool:
        """Nothing queued, running or in flight on the device."""
        return self.pending is None and self.scheduler.is_finished()

    def step(self) -> list[Sequence]:
        """One step (with async scheduling: launch the next step, then postprocess the one in
        flight); returns the sequences that finished. After an exception every queued sequence is
        dropped, so that the next step starts clean."""
        try:
            if self.pending is not None:
                self.pending, finished = self._step_ahead(self.pending)
                return finished
            batch = self.scheduler.schedule()
            if batch.is_empty:
                if not batch.finished and not self.scheduler.is_finished():
                    raise RuntimeError(f"the scheduler made no progress: {len(self.scheduler.waiting)} "
                                       f"waiting, {len(self.scheduler.running)} running")
                return batch.finished
            if self.async_scheduling and self.runner.supports_async(batch):
                self.pending = self.runner.sample_async(self.runner.launch(batch))
                return batch.finished
            tokens = self.runner.run(batch)
            return batch.finished + self.scheduler.postprocess(batch, tokens)
        except BaseException:
            self.abort()
            raise

    def _step_ahead(self, pending: PendingStep) -> tuple[PendingStep | None, list[Sequence]]:
        """Launch the step after ``pending`` if it can be scheduled now, then postprocess
        ``pending``; returns the step now in flight (None: drained) and the finished sequences."""
        batch = self.scheduler.schedule_ahead(pending.batch)
        launched = self.runner.launch(batch, pending.tokens) if batch is not None else None
        finished = self.scheduler.postprocess(pending.batch, pending.token_ids())
        if launched is None:
            return None, finished
        rows = None  # every entry samples unless its sequence stopped on its pending token
        if finished and any(entry.seq.is_finished for entry in batch.entries):
            rows = [i for i, entry in enumerate(batch.entries) if not entry.seq.is_finished]
        return self.runner.sample_async(launched, rows), finished

    def abort(self) -> None:
        """Drop every queued sequence (after an exception); work still queued on the device only
        touches the freed blocks before any later step can reuse them (stream order)."""
        self.pending = None
        scheduler = self.scheduler
        for seq in list(scheduler.running):
            scheduler.block_manager.deallocate(seq)
        scheduler.running.clear()
        scheduler.waiting.clear()
