"""Startup: from ``LLM(...)`` to the first generated token, cold and warm compile caches, per mode.

Each measurement is a fresh process (``python -m infer.benchmarks.startup --child ...``) with
``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR`` and the engine's own compile cache
(``INFER_COMPILE_CACHE_DIR``) under a new temporary folder per mode:
"cold" is the first process on the empty folder, "warm" the second on the same folder. The
child times ``LLM(...)`` and a first ``generate`` of one token, and splits the time with:

- load: the loader's "loaded ..." log record, relative to the start of ``LLM(...)``;
- compile: Dynamo's own time for every frame it compiled (backend included) plus the loads from
  the engine's compile cache; split (summed over every graph, ``REPORTS.totals()``) into
  dynamo (tracing: the frames' time less the backend's), aot (AOT tracing to ATen), passes and
  inner (graph split and inner compiler);
- capture: ``LLM.capture_seconds`` less the compile time (the first graph compiles inside the
  first capture warm-up), n/a where the engine does not expose it;
- other: the rest (tokenizer, KV sizing and profile run execution, first prefill, ...).

``--baseline DIR`` measures another checkout of this repository alongside, on the same machine
(rows with code "baseline", each run alternating with this tree's): its children find its
``infer`` first on ``PYTHONPATH``. For A/B of startup changes, e.g. ``git worktree add /tmp/base REV``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .decode_step import qwen3_config
from .harness import Column, Settings, Table, measure, ok_rows, open_table, release_memory, skipped
from .hf_baselines import save_checkpoint
from .throughput import LLM_MODES, uses_inductor

logger = logging.getLogger(__name__)

MARKER = "STARTUP_RESULT "
DEFAULT_MODES = ("inductor", "eager")
CHILD_TIMEOUT_S = 600
FIRST_PROMPT = list(range(3, 19))  # 16 token ids
PHASES = ("cold", "warm")


class _LogTimes(logging.Handler):
    """Keeps ``(time, logger name, message)`` of every record, to date the engine's milestones."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.name, record.getMessage()))

    def first(self, name: str, prefix: str) -> float | None:
        return next((t for t, n, m in self.records if n.startswith(name) and m.startswith(prefix)), None)


class _TritonCompiles:
    """Dates every Triton kernel compile (``jit_post_compile_hook``; fires in pool threads too)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        try:
            from triton import knobs
            knobs.runtime.jit_post_compile_hook = self._hook
        except (ImportError, AttributeError):
            pass

    def _hook(self, *, fn, **_) -> None:
        self.events.append((time.perf_counter(), fn.name))

    def between(self, start: float, end: float) -> list[str]:
        return [name for t, name in self.events if start <= t < end]


def child_main(argv: list[str]) -> int:
    """The measured process: one ``LLM(...)`` and one first token; prints one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model", required=True)
    parser.add_argument("--llm-kwargs", required=True, help="LLM keyword arguments as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--spawned-at", type=float, required=True, help="time.time() of the parent at spawn")
    args = parser.parse_args(argv)
    python_start_s = time.time() - args.spawned_at
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    times = _LogTimes()
    logging.getLogger("infer").addHandler(times)
    logging.getLogger("infer").setLevel(logging.INFO)
    from ..compiler import compilation_count
    from ..compiler.report import REPORTS
    from ..runtime.engine.llm import LLM
    from ..runtime.engine.sampling import SamplingParams

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compiles = _TritonCompiles()
    wall0, start = time.time(), time.perf_counter()
    llm = LLM(args.model, dtype="bfloat16", max_model_len=args.max_model_len, compile=True, device=args.device,
              **json.loads(args.llm_kwargs))
    sync()
    init_end = time.perf_counter()
    init_s = init_end - start
    out = llm.generate([FIRST_PROMPT], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    sync()
    ttft_s = time.perf_counter() - start
    if out[0].finish_reason == "error":
        raise RuntimeError(f"first request failed: {out[0].error}")
    loaded = times.first("infer.models.loader", "loaded ")
    totals = REPORTS.totals()
    frames_s = _dynamo_frames_s() or 0.0
    compile_s = frames_s + totals["cached_s"]
    capture_s = getattr(llm, "capture_seconds", None)
    result = dict(python_start_s=python_start_s, init_s=init_s, first_generate_s=ttft_s - init_s, ttft_s=ttft_s,
                  total_s=python_start_s + ttft_s, load_s=None if loaded is None else loaded - wall0,
                  compile_total_s=compile_s, graphs_compiled=compilation_count(),
                  dynamo_s=max(frames_s - totals["compiled_s"], 0.0), aot_s=totals["aot_s"],
                  passes_s=totals["passes_s"], inner_s=totals["inner_s"],
                  capture_s=None if capture_s is None else max(capture_s - compile_s, 0.0),
                  infer_tree=str(Path(__file__).resolve().parents[1]),  # which checkout ran
                  triton_compiles_init=len(compiles.between(start, init_end)),
                  triton_compiled_in_generate=compiles.between(init_end, start + ttft_s))
    known = [result["load_s"], result["compile_total_s"], result["capture_s"]]
    result["other_s"] = ttft_s - sum(v for v in known if v is not None)
    print(MARKER + json.dumps(result), flush=True)
    return 0


def _dynamo_frames_s() -> float | None:
    from ..torch_internals import dynamo_frame_times
    frames = dynamo_frame_times()
    return float(sum(frames)) if frames else None


def check_baseline(tree: str | Path) -> Path:
    """``tree`` resolved, if it is an infer tree (a checkout of this repository); else ValueError."""
    tree = Path(tree).resolve()
    if not (tree / "__init__.py").is_file() or not (tree / "benchmarks" / "startup.py").is_file():
        raise ValueError(f"--baseline {str(tree)!r} is not an infer tree (expected __init__.py and "
                         f"benchmarks/startup.py at its top, as in a checkout of this repository)")
    return tree


def baseline_path(tree: str | Path, root: Path) -> Path:
    """A folder under ``root`` whose ``infer`` is the infer tree ``tree`` (a checkout of another
    revision): put first on a child's ``PYTHONPATH``, it shadows the installed ``infer``."""
    tree = check_baseline(tree)
    folder = root / "baseline-path"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "infer"
    if not link.exists():
        link.symlink_to(tree, target_is_directory=True)
    return folder


def spawn(model: Path, llm_kwargs: dict, cache_root: Path, settings: Settings, log: Path | None,
          pycache: Path | None = None, pythonpath: Path | None = None) -> dict[str, Any]:
    """Run one child with its compile caches under ``cache_root``; returns its result dict.
    ``pycache``: the child reads and writes Python bytecode there (see :func:`prime_bytecode`).
    ``pythonpath``: put first on the child's path (a :func:`baseline_path`)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_root / "inductor"),
               TRITON_CACHE_DIR=str(cache_root / "triton"), INFER_COMPILE_CACHE_DIR=str(cache_root / "infer"),
               PYTHONUNBUFFERED="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    cmd = [sys.executable, "-m", "infer.benchmarks.startup", "--child", "--model", str(model),
           "--llm-kwargs", json.dumps(llm_kwargs), "--device", settings.device,
           "--max-model-len", str(4096 if settings.cuda else 256), "--spawned-at", repr(time.time())]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=120 if settings.tiny else CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"startup child ran past {err.timeout} s") from err
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"startup child exited {proc.returncode}: {tail}")
    return json.loads(lines[-1][len(MARKER):])


COLUMNS = [Column("shape", "shape"), Column("mode", "mode"), Column("code", "code"), Column("run", "run"),
           Column("phase", "cache"),
           Column("ttft_s", "LLM() to 1st token s", ".1f"), Column("load_s", "load s", ".1f"),
           Column("dynamo_s", "dynamo s", ".1f"), Column("aot_s", "aot s", ".1f"),
           Column("passes_s", "passes s", ".2f"), Column("inner_s", "inner s", ".1f"),
           Column("compile_total_s", "compile total s", ".1f"),
           Column("capture_s", "graph capture s", ".1f"), Column("other_s", "other s", ".1f"),
           Column("python_start_s", "process start s", ".1f"), Column("graphs_compiled", "graphs"),
           Column("triton_compiles_init", "Triton compiles")]


def prime_bytecode(root: Path, settings: Settings, llm_modes: tuple[str, ...],
                   pythonpaths: tuple[Path | None, ...] = (None,)) -> Path:
    """Fill a Python bytecode folder by running the engine once on the tiny shape; returns it.

    A pip-installed torch ships its bytecode; an environment without it (and with
    ``PYTHONDONTWRITEBYTECODE=1``, as on our GPU machines) compiles every module of torch,
    Dynamo, Inductor and transformers from source in every process, seconds that no user pays.
    The measured children reuse this folder (``PYTHONPYCACHEPREFIX``); their compile caches stay
    cold. ``--python-bytecode as-is`` measures the environment unchanged. One priming child per
    entry of ``pythonpaths`` (this tree, and a baseline's)."""
    pycache = root / "pycache"
    model = save_checkpoint(qwen3_config("tiny"), root / "tiny-checkpoint", settings.device)
    mode = next((m for m in llm_modes if uses_inductor(m)), llm_modes[0])
    start = time.perf_counter()
    for i, path in enumerate(pythonpaths):
        spawn(model, LLM_MODES[mode], root / f"cache-prime-{i}", settings, None, pycache, path)
    logger.info("startup: Python bytecode primed in %.1f s (%s mode, tiny shape)", time.perf_counter() - start, mode)
    return pycache


def run(settings: Settings, llm_modes: tuple[str, ...] = DEFAULT_MODES) -> Table:
    table = open_table(settings, "startup", "Startup: LLM(...) to first token, cold vs warm compile caches",
                       COLUMNS, ("shape", "mode", "code", "run", "phase"))
    shape = settings.shapes[0]
    cfg = qwen3_config(shape)
    table.note("compile total: all Dynamo frames + compile-cache loads, split into dynamo/aot/passes/inner summed "
               "over every graph; graph capture: LLM.capture_seconds less compile; other: the rest of LLM() + "
               "first generate (tokenizer, profile run, KV cache, prefill)")
    if not settings.cuda:
        table.note("CPU run: the engine compiles at the first generate (no profile run on CPU)")
    if settings.cuda:
        table.note(f"Python bytecode: {settings.python_bytecode} (cached: primed once by a tiny-shape run, as a "
                   f"pip install ships it; as-is: the environment's own)")
    with tempfile.TemporaryDirectory(prefix="infer-bench-startup-", dir=settings.tmp_dir) as root:
        codes: dict[str, Path | None] = {"this": None}
        if settings.baseline:
            codes["baseline"] = baseline_path(settings.baseline, Path(root))
            table.note(f"code: this = the installed infer; baseline = {Path(settings.baseline).resolve()}, "
                       f"alternating with it in each run")
        model = save_checkpoint(cfg, Path(root) / "checkpoint", settings.device)
        release_memory()
        primed = settings.cuda and settings.python_bytecode == "cached"  # CPU runs are tests: no extra child
        pycache = prime_bytecode(Path(root), settings, llm_modes, tuple(codes.values())) if primed else None
        for run_index in range(1, settings.repeat + 1):
            for mode in llm_modes:
                for code, path in codes.items():
                    caches = Path(root) / f"cache-{mode}-{code}-{run_index}"  # cold: the first process on it
                    for phase in PHASES:
                        base = dict(shape=shape, mode=mode, code=code, run=run_index, phase=phase)
                        if not settings.cuda and uses_inductor(mode):
                            skipped(table, base, "Inductor modes need CUDA here (CPU run: slow C++ compile)")
                            continue
                        name = "-".join([mode, *([code] if settings.baseline else []), phase,
                                         *([str(run_index)] if settings.repeat > 1 else [])])
                        log = settings.out_dir / "startup_logs" / f"{name}.log" if settings.out_dir else None
                        logger.info("startup %s %s %s %s (run %d): spawning a fresh process", shape, mode, code,
                                    phase, run_index)
                        measure(table, base,
                                lambda: spawn(model, LLM_MODES[mode], caches, settings, log, pycache, path))
    return table


def plot(fig, table: Table) -> None:
    ax = fig.subplots()
    rows = ok_rows(table)
    parts = ["load_s", "dynamo_s", "aot_s", "passes_s", "inner_s", "capture_s", "other_s"]
    labels = [f"{r['mode']}\n{r['phase']}" + ("" if r.get("code", "this") == "this" else f"\n{r['code']}")
              for r in rows]
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [max(r.get(part) or 0.0, 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds, LLM() to first token")
    ax.legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
