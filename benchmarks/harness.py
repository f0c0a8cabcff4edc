"""Shared pieces of the benchmark harness: result tables, failure capture, JSON / markdown / PNG output.

A :class:`Table` is one scenario's result: rows are plain dicts, ``columns`` says which keys the
markdown shows and how. Every row carries ``status``: ``"ok"``, ``"oom"``, ``"skipped: why"`` or
``"error: why"``; a failing row never stops the scenario (:func:`measure`).
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

OK = "ok"
OOM = "oom"
STATUS_CHARS = 90  # longest status text in the markdown (the JSON keeps all of it)


@dataclass(frozen=True, slots=True)
class Column:
    """One markdown column: ``key`` of the row dict, ``header``, and a format spec for numbers."""

    key: str
    header: str
    fmt: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    """What every scenario reads from the command line (built once in ``__main__``)."""

    device: str
    out_dir: Path | None
    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    steps: int
    quick: bool = False
    tiny: bool = False
    modes: tuple[str, ...] = ()
    hf: bool = True
    tmp_dir: str | None = None
    append: bool = False  # keep the rows of an earlier run in out_dir (same device), replacing re-measured ones
    python_bytecode: str = "cached"  # startup children: "cached" (primed once) or "as-is" (the environment's)
    repeat: int = 1  # startup: cold + warm pairs per mode, each on fresh compile caches
    baseline: str | None = None  # startup: another infer tree (a checkout) measured alongside this one

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def median_ms(fn: Callable[[], Any], device: str, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()``: CUDA events on CUDA, a host clock on CPU."""
    for _ in range(warmup):
        fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(max(1, iters)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms_per_call(fn: Callable[[int], Any], calls: int, replays: int = 15) -> float:
    """Median milliseconds per call of ``fn(0), ..., fn(calls - 1)``, captured back to back in one
    CUDA graph and replayed ``replays`` times.

    One graph launch is shared by ``calls`` kernels, as in a captured decode step: timing a single
    kernel per replay between two events would count the host's graph launch in it (~11 us for a
    decode-attention launch that reads one tile per program, H200). ``fn(i)`` may work on its own
    copy of the data, so that L2 cannot serve what a real step streams from memory."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(max(1, replays)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def write_rows(path: str | None, rows: list[dict], **meta: Any) -> None:
    """A kernel benchmark's result file: ``{"device": ..., **meta, "rows": rows}`` as JSON at ``path``
    (nothing without one). Called after every row, a killed run keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps(dict(device=device_name("cuda"), **meta, rows=rows), indent=1))


def environment(device: str) -> dict[str, Any]:
    """Device, date and library versions, stored with every table."""
    env = {"device": device_name(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is only noted
            env[name] = "n/a"
    return env


@dataclass
class Table:
    """Rows of one scenario, written to ``out_dir/<scenario>.json|.md|.png``."""

    scenario: str
    title: str
    columns: list[Column]
    device: str = "cpu"
    out_dir: Path | None = None
    key: tuple[str, ...] = ()  # fields that name a row: a new row replaces an old one with the same key
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = self.env or environment(self.device)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append ``row`` (``status`` defaults to ok) and save the JSON so far (survives a kill)."""
        row.setdefault("status", OK)
        if self.key:
            name = tuple(row.get(k) for k in self.key)
            self.rows = [r for r in self.rows if tuple(r.get(k) for k in self.key) != name]
        self.rows.append(row)
        logger.info("[%s] %s", self.scenario, _short(row))
        self.write_json(partial=True)
        return row

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def payload(self, partial: bool = False) -> dict[str, Any]:
        return {"scenario": self.scenario, "title": self.title, **self.env, "meta": self.meta,
                "notes": self.notes, "columns": [c.key for c in self.columns], "rows": self.rows,
                "partial": partial}

    def write_json(self, partial: bool = False) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.scenario}.json"
        path.write_text(json.dumps(self.payload(partial), indent=1, default=_jsonable))

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"device: {self.env['device']}, date: {self.env['date']}, "
                 f"torch {self.env['torch']}, transformers {self.env.get('transformers', 'n/a')}", ""]
        lines += [f"- {k}: {_fmt(v, '.4g')}" for k, v in self.meta.items()]
        lines += [f"- note: {n}" for n in self.notes]
        lines += ["", "| " + " | ".join(c.header for c in self.columns) + " | status |",
                  "|" + "---|" * (len(self.columns) + 1)]
        for row in self.rows:
            cells = [_fmt(row.get(c.key), c.fmt) for c in self.columns]
            status = str(row.get("status", OK)).replace("|", "/").replace("\n", " ")
            cells.append(status if len(status) <= STATUS_CHARS else status[:STATUS_CHARS - 3] + "...")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def finish(self, plot: Callable[[Any, "Table"], None] | None = None, partial: bool = False) -> str:
        """Write JSON, markdown and (when ``plot`` draws on a matplotlib figure) the PNG."""
        if self.out_dir is not None and plot is not None:
            save_plot(self, plot)
        self.write_json(partial)
        text = self.markdown()
        if self.out_dir is not None:
            (self.out_dir / f"{self.scenario}.md").write_text(text)
            logger.info("wrote %s/%s.{json,md}", self.out_dir, self.scenario)
        return text


def open_table(settings: Settings, scenario: str, title: str, columns: list[Column],
               key: tuple[str, ...]) -> Table:
    """A new :class:`Table`; with ``settings.append`` it starts from the rows already in ``out_dir``."""
    table = Table(scenario, title, columns, settings.device, settings.out_dir, key=key)
    path = settings.out_dir / f"{scenario}.json" if settings.out_dir else None
    if not settings.append or path is None or not path.is_file():
        return table
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("--append: cannot read %s (%s); starting a new table", path, err)
        return table
    if earlier.get("device") != table.env["device"]:
        logger.warning("--append: %s was measured on %r, not %r; starting a new table", path,
                       earlier.get("device"), table.env["device"])
        return table
    table.rows = list(earlier.get("rows", []))
    table.note(f"rows appended to those of {earlier.get('date')}")
    logger.info("--append: %d earlier rows from %s", len(table.rows), path)
    return table


def save_plot(table: Table, draw: Callable[[Any, Table], None]) -> None:
    """``draw(figure, table)`` into ``<scenario>.png``; matplotlib is optional (a note when it fails)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        table.note(f"no plot: matplotlib unavailable ({err})")
        return
    fig = plt.figure(figsize=(9, 5.5))
    try:
        draw(fig, table)
        fig.suptitle(f"{table.title}\n{table.env['device']}, {table.env['date'][:10]}", fontsize=9)
        fig.tight_layout()
        table.out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(table.out_dir / f"{table.scenario}.png", dpi=120)
    except Exception as err:  # noqa: BLE001 - a plot must never cost the numbers
        logger.exception("plot of %s failed", table.scenario)
        table.note(f"no plot: {type(err).__name__}: {err}")
    finally:
        plt.close(fig)


def status_of(err: BaseException) -> str:
    """The ``status`` of a row that raised ``err``: ``"oom"`` or ``"error: Type: message"``."""
    if isinstance(err, torch.OutOfMemoryError):
        return OOM
    return f"error: {type(err).__name__}: {err}"


def measure(table: Table, base: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``table.add(base | fn())``; an OOM gives ``status="oom"``, any other exception ``"error: ..."``."""
    row = dict(base)
    try:
        row.update(fn())
    except Exception as err:  # noqa: BLE001 - recorded in the row, the scenario goes on
        if not isinstance(err, torch.OutOfMemoryError):
            logger.exception("row %s failed", base)
        row["status"] = status_of(err)
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        release_memory()
    return table.add(row)


def skipped(table: Table, base: dict[str, Any], why: str) -> dict[str, Any]:
    return table.add(dict(base, status=f"skipped: {why}"))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ok_rows(table: Table, **match: Any) -> list[dict[str, Any]]:
    """Rows with status ok whose fields equal ``match``."""
    return [r for r in table.rows if r.get("status") == OK and all(r.get(k) == v for k, v in match.items())]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return format(value, fmt or ".4g")
    if isinstance(value, int) and not isinstance(value, bool) and fmt:
        return format(value, fmt)
    return str(value).replace("|", "/")


def _short(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v, '.4g')}" for k, v in row.items() if k != "error")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)
