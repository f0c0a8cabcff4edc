"""Compile this project's Triton kernels concurrently instead of one by one at their first launch.

A cold start compiles a dozen kernel specializations (norms, rotary, KV write, prefill and decode
attention, the GEMVs per row count), ~0.5-1.5 s each, every one at its first launch. Their
arguments are only known at those launches, so the engine runs *dry* steps first, inside
:meth:`KernelCompiles.deferring`: a launch whose kernel is not compiled yet neither compiles nor
runs (Triton's ``jit_cache_hook`` answers "handled"); its exact specialization is handed off
instead. The real steps after :meth:`KernelCompiles.wait` find every kernel ready.

A pool thread compiles it (``JITFunction.preload``) into the kernel's own cache, then builds and
loads its launcher (a C compile when Triton's cache is cold). Triton releases the GIL in LLVM code
generation and runs ``ptxas`` and the C compiler as subprocesses, so the compiles overlap one
another and the main thread; its Python front end does hold the GIL, which slows the dry steps
and Dynamo meanwhile. Threads, not worker processes: processes that each import torch contend
with the weight load. Re-measure: ``python -m infer.benchmarks startup``.

While deferring, no Triton kernel of the project runs at all: a launch of a kernel that is compiled
already is skipped too (every launch goes through :func:`.launch.launch`, which inside
:func:`.launch.dry_launches` makes Triton's warm-up call: it binds the arguments and stops before
the launch). Its first launch would build its launcher on the calling thread, a C
compile (0.4-0.6 s each on a slow host) that the pool thread which compiled the kernel is
running at the same time; three such launches cost a cold 8B start 1.45 s of its main thread.

A dry step computes garbage (skipped kernels leave their outputs unwritten): it may only be
used for what it launches, never for its values. The Triton interpreter (``TRITON_INTERPRET=1``)
and CPU tensors never reach the hook, so there it changes nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from ... import envs
from .launch import dry_launches

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
DRY_SWITCH_INTERVAL_S = 0.0005


def _knobs():
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4: no hooks, every kernel compiles at its first launch
        return None
    return knobs.runtime if hasattr(knobs.runtime, "jit_cache_hook") else None


class KernelCompiles:
    """The pool that compiles the Triton kernels dry launches name (see the module docstring).

    ``with compiles.deferring():`` runs dry; :meth:`wait` blocks until every compile handed off
    so far is done (several dry phases may share the pool); :meth:`close` shuts it down.
    The hook is process-wide: while deferring, launches from any thread are dry.
    ``failed``: compiles that raised (the real launch compiles again and reports the error)."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triton-compile")
        self._futures: dict[tuple[int, str], Future] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # .compiling: this pool thread is inside its own preload
        self.names: list[str] = []
        self.failed: list[str] = []
        self.timings: list[tuple[float, float, str]] = []  # (seconds compiling, finished at, kernel) per compile

    @property
    def submitted(self) -> int:
        return len(self._futures)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside: a launch of a not-yet-compiled kernel is handed off and skipped."""
        knobs = _knobs()
        previous, interval = knobs.jit_cache_hook, sys.getswitchinterval()
        knobs.jit_cache_hook = self._hook
        # The pool's Python front end takes the GIL from the dry steps; a short switch interval
        # hands it back to them sooner than the default 5 ms.
        sys.setswitchinterval(DRY_SWITCH_INTERVAL_S)
        try:
            with dry_launches():  # no launch, compiled or not (see the module docstring)
                yield
        finally:
            knobs.jit_cache_hook = previous
            sys.setswitchinterval(interval)

    def _hook(self, *, key, fn, compile, is_manual_warmup, **_) -> bool:
        """Triton's ``jit_cache_hook``: True skips the compile and the launch."""
        if getattr(self._local, "compiling", False):  # a pool thread's own preload: compile it here
            return False
        jit, data = fn.jit_function, compile.get("specialization_data")
        if data is None or not hasattr(jit, "preload"):  # a Triton without preload: compile at launch
            return False
        with self._lock:
            if (id(jit), key) not in self._futures:
                self._futures[(id(jit), key)] = self._pool.submit(self._compile, jit, compile["device"], data, fn.name)
                self.names.append(fn.name)
        return True

    def _compile(self, jit, device: int, specialization_data: str, name: str) -> None:
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.set_device(device)  # a pool thread starts on device 0
        self._local.compiling = True
        try:
            kernel = jit.preload(specialization_data)
        finally:
            self._local.compiling = False
        init = getattr(kernel, "_init_handles", None)
        if init is not None:  # the launcher (built, or a C compile when cold) and the module load
            init()
        end = time.perf_counter()
        with self._lock:
            self.timings.append((end - start, end, name))

    def wait(self) -> float:
        """Block until every compile handed off so far is done; returns the seconds waited."""
        start = time.perf_counter()
        with self._lock:
            futures = list(self._futures.values())
        wait(futures)
        seconds = time.perf_counter() - start
        self.failed = [repr(f.exception()) for f in futures if f.exception() is not None]
        if self.failed:
            logger.warning("%d deferred Triton compiles failed (they compile again at launch): %s",
                           len(self.failed), self.failed[:3])
        if futures:
            logger.info("compiled %d Triton kernels in parallel, %.1fs after the dry runs: %s",
                        len(futures), seconds, sorted(set(self.names)))
            logger.info("slowest compiles (s): %s; the last ones to finish: %s", _slowest(self.timings),
                        [name for _, _, name in sorted(self.timings, key=lambda t: t[1])[-3:]])
        return seconds

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _slowest(timings: list[tuple[float, float, str]], count: int = 4) -> list[str]:
    return [f"{name} {seconds:.2f}" for seconds, _, name in sorted(timings, reverse=True)[:count]]


def parallel_compiles(device: torch.device, workers: int | None = None) -> KernelCompiles | None:
    """A :class:`KernelCompiles` for ``device``; None where dry runs do not apply: not CUDA, the
    Triton interpreter, a Triton without hooks, or ``INFER_PARALLEL_COMPILE=0``."""
    if device.type != "cuda" or _knobs() is None or envs.triton_interpret() or not envs.parallel_compile():
        return None
    return KernelCompiles(workers or min(DEFAULT_WORKERS, os.cpu_count() or 1))
