"""The compile report: what the backend did to the most recent graph it compiled."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

from .. import torch_internals as internals


@dataclass(slots=True)
class CompileReport:
    """Filled in while one Dynamo graph is compiled; frozen into `last_report()` when done."""

    inner_compiler: str
    passes: dict[str, int] = field(default_factory=dict)  # pass name -> rewrites
    fusions: dict[str, int] = field(default_factory=dict)  # fusion kind -> sites fused
    near_misses: list[str] = field(default_factory=list)  # sites that looked close, with the reason
    nodes_before: int = 0
    nodes_after: int = 0
    pieces: int = 1
    split_ops: dict[str, int] = field(default_factory=dict)  # op name -> calls split at
    split_ops_run_on: str | None = None  # what the splitting ops run on, as their owners describe it
    cudagraph_mode: str = "none"
    cudagraphs: object = None  # CudaGraphStats, filled as graphs are captured at run time
    cached: bool = False  # loaded from the compile cache: no Dynamo, AOT or passes ran
    time_dynamo_s: float | None = None
    time_aot_s: float = 0.0  # AOT autograd: functionalization, decompositions, tracing to ATen
    time_passes_s: float = 0.0
    time_inner_s: float = 0.0  # graph split and inner compilation of the pieces
    time_total_s: float = 0.0  # the backend: AOT + passes + inner

    def count_fusion(self, kind: str, n: int = 1) -> None:
        self.fusions[kind] = self.fusions.get(kind, 0) + n

    def summary(self) -> str:
        lines = [f"inner compiler   {self.inner_compiler}" + (" (graph from the compile cache)" if self.cached else ""),
                 f"nodes            {self.nodes_before} -> {self.nodes_after}",
                 f"pieces           {self.pieces}" + (f" (split at {self.split_ops})" if self.split_ops else ""),
                 f"passes           {self.passes}",
                 f"fusions          {self.fusions}"]
        if self.cudagraphs is not None:
            lines.append(f"cuda graphs      {self.cudagraph_mode}: {self.cudagraphs.captured_graphs} captured, "
                         f"{self.cudagraphs.pool_bytes / 2**20:.1f} MiB, sizes {self.cudagraphs.sizes}")
        if self.split_ops_run_on:
            lines.append(f"split ops run on {self.split_ops_run_on}")
        dyn = "n/a" if self.time_dynamo_s is None else f"{self.time_dynamo_s:.2f}s"
        lines.append(f"time             dynamo {dyn}, aot {self.time_aot_s:.2f}s, passes {self.time_passes_s:.3f}s, "
                     f"inner {self.time_inner_s:.2f}s")
        return "\n".join(lines)


class _ReportStore:
    """Holds the newest report; Dynamo's own timing of the frame is read once it has finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: CompileReport | None = None
        self._frames_before = 0
        self.compilations = 0  # graphs compiled by this process, for tests and logs
        self._totals = {"aot_s": 0.0, "passes_s": 0.0, "inner_s": 0.0, "compiled_s": 0.0, "cached_s": 0.0}

    def frames_compiled(self) -> int:
        return len(_dynamo_frame_times())

    def publish(self, report: CompileReport, frames_before: int) -> None:
        with self._lock:
            self._report, self._frames_before = report, frames_before
            self.compilations += 1
            t = self._totals
            t["aot_s"] += report.time_aot_s
            t["passes_s"] += report.time_passes_s
            t["inner_s"] += report.time_inner_s
            t["cached_s" if report.cached else "compiled_s"] += report.time_total_s

    def totals(self) -> dict[str, float]:
        """Seconds summed over every graph this process compiled or loaded from the compile cache:
        ``aot_s``, ``passes_s``, ``inner_s``; ``compiled_s`` is the backend time of compiled graphs
        (inside Dynamo's frames), ``cached_s`` that of loads from the cache (no Dynamo)."""
        with self._lock:
            return dict(self._totals)

    def last(self) -> CompileReport | None:
        with self._lock:
            report = self._report
            if report is None:
                return None
            times = _dynamo_frame_times()
            if report.time_dynamo_s is None and len(times) > self._frames_before:
                frame_s = times[self._frames_before]
                report.time_dynamo_s = max(frame_s - report.time_total_s, 0.0)
            return dataclasses.replace(report, passes=dict(report.passes), fusions=dict(report.fusions),
                                       near_misses=list(report.near_misses), split_ops=dict(report.split_ops))


def _dynamo_frame_times() -> list[float]:
    return internals.dynamo_frame_times()


REPORTS = _ReportStore()


def last_report() -> CompileReport | None:
    """The report of the most recent graph compiled with `backend="infer"` (None before any)."""
    return REPORTS.last()


def compilation_count() -> int:
    """How many graphs `backend="infer"` has compiled in this process."""
    return REPORTS.compilations
