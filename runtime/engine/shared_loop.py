"""One engine loop shared by every thread that calls ``LLM.generate``.

Requests of concurrent calls join one continuous batch: a call queues its sequences in an inbox
and then takes turns with the other calls at running engine steps, one thread at a time; each
finished sequence goes to the call that queued it. A step that raises fails every call with
requests in flight (the engine loop dropped them); the engine is clean for the next call. The
queued requests of a call that stops waiting (an interrupt) run for nobody, or not at all if they
have not started.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from .engine_loop import EngineLoop
from .sequence import Sequence

logger = logging.getLogger(__name__)


class _Waiter:
    """One call in flight: the request ids it waits for, the sequences finished for it but not yet
    handed back, and the error of a step that failed it."""

    __slots__ = ("pending", "finished", "error")

    def __init__(self, seqs: list[Sequence]) -> None:
        self.pending = {seq.request_id for seq in seqs}
        self.finished: list[Sequence] = []
        self.error: BaseException | None = None


class SharedLoop:
    def __init__(self, engine_loop: EngineLoop) -> None:
        self.engine_loop = engine_loop
        self._turn = threading.Condition()
        self._stepping = False  # a thread is running a step
        self._inbox: list[Sequence] = []  # queued by a call, not yet handed to the scheduler
        self._owners: dict[int, _Waiter] = {}  # request id -> the call that waits for it
        self._orphans: set[int] = set()  # request ids nobody waits for any more

    def run(self, seqs: list[Sequence]) -> Iterator[Sequence]:
        """Queue ``seqs``; yield each as it finishes (in this thread), stepping the engine whenever
        no other thread does."""
        waiter = _Waiter(seqs)
        with self._turn:
            self._inbox.extend(seqs)
            self._owners.update((seq.request_id, waiter) for seq in seqs)
        try:
            while waiter.pending:
                with self._turn:
                    while not waiter.finished and waiter.error is None and self._stepping:
                        self._turn.wait()
                    done, waiter.finished = waiter.finished, []
                    error = waiter.error
                    step = not done and error is None
                    if step:
                        self._stepping = True
                        admitted, self._inbox = self._inbox, []
                for seq in done:
                    waiter.pending.discard(seq.request_id)
                    yield seq
                if error is not None:
                    raise RuntimeError(f"generate failed in a step run by another thread: {error!r}") from error
                if step:
                    self._step(admitted)
        finally:
            if waiter.pending:
                with self._turn:
                    for request_id in waiter.pending:
                        self._owners.pop(request_id, None)
                    self._orphans.update(waiter.pending)

    def _step(self, admitted: list[Sequence]) -> None:
        """One engine step by this thread (holding the turn); hands the finished sequences to their
        calls, or the step's exception to every call in flight."""
        finished, error = [], None
        try:
            scheduler = self.engine_loop.scheduler
            for seq in admitted:
                scheduler.add(seq)
            if self._orphans:
                self._drop_orphans()
            finished = self.engine_loop.step()
        except BaseException as err:
            error = err
        with self._turn:
            self._stepping = False
            for seq in finished:
                owner = self._owners.pop(seq.request_id, None)
                if owner is not None:
                    owner.finished.append(seq)
            if error is not None:
                for owner in set(self._owners.values()):
                    owner.error = error
                self._owners.clear()
                self._inbox.clear()
            self._turn.notify_all()
        if error is not None:
            raise error

    def _drop_orphans(self) -> None:
        """Orphaned requests still waiting to start are not run at all (a waiting one holds no blocks)."""
        with self._turn:
            orphans, self._orphans = self._orphans, set()
        waiting = self.engine_loop.scheduler.waiting
        kept = [seq for seq in waiting if seq.request_id not in orphans]
        if len(kept) != len(waiting):
            logger.info("dropped %d queued requests of an interrupted generate call", len(waiting) - len(kept))
            waiting.clear()
            waiting.extend(kept)
