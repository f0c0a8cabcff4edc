"""The benchmark harness: ``python -m infer.benchmarks SCENARIO [options]``.

Scenarios: ``floor``, ``decode``, ``throughput``, ``startup``, ``kernels``, ``cpu`` and ``all``. Each writes
``OUT/SCENARIO.json`` (after every row), ``OUT/SCENARIO.md`` and ``OUT/SCENARIO.png``, and refreshes
``OUT/README_table.md`` (every scenario table in OUT). ``--append`` keeps the rows of an earlier run
(to split a long scenario over several commands); ``tables`` rebuilds markdown and plots from the
JSON files (after a killed run). The markdown tables are printed last. ``--tiny`` swaps in a tiny
Qwen3 config so that everything runs on CPU in seconds (CUDA-only rows are skipped with a note).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import cpu, decode, floor, startup, throughput
from .harness import Column, Settings, Table, measure, ok_rows, open_table, skipped, status_of

logger = logging.getLogger(__name__)

SCENARIOS = ("floor", "decode", "throughput", "startup", "kernels", "cpu")
GRID = {"full": ((1, 8, 64, 256), (512, 2048)), "quick": ((1, 64), (512,)), "tiny": ((1, 4), (16,))}
STEPS = {"full": 50, "quick": 20, "tiny": 3}
DEFAULT_SHAPES = {"floor": ("0.6b", "8b"), "decode": ("0.6b", "8b"), "throughput": ("0.6b",),
                  "startup": ("8b",), "kernels": ("0.6b",), "cpu": ("smollm2-135m",)}
CPU_BATCHES = {"full": (1, 8), "quick": (1, 8), "tiny": (1, 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="results", help="output folder (default: results/)")
    common.add_argument("--shape", nargs="+", choices=("0.6b", "8b"), help="model shapes (default per scenario)")
    common.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    common.add_argument("--quick", action="store_true", help="fewer sizes, steps and sequences")
    common.add_argument("--tiny", action="store_true", help="tiny Qwen3 config: the whole run takes seconds on CPU")
    common.add_argument("--batch", type=int, nargs="+", help="decode/floor batch sizes (overrides the grid)")
    common.add_argument("--context", type=int, nargs="+", help="decode/floor context lengths (overrides the grid)")
    common.add_argument("--steps", type=int, help="timed steps per row")
    common.add_argument("--modes", nargs="+", choices=decode.ALL_MODES, help="decode modes")
    common.add_argument("--no-hf", action="store_true", help="skip the Hugging Face decode baselines")
    common.add_argument("--llm-modes", nargs="+", choices=sorted(throughput.LLM_MODES),
                        help="infer.LLM compile modes for throughput / startup")
    common.add_argument("--tmp", help="folder for temporary checkpoints and compile caches")
    common.add_argument("--python-bytecode", choices=("cached", "as-is"), default="cached",
                        help="startup: children reuse Python bytecode primed once (default), or the environment's")
    common.add_argument("--repeat", type=int, default=1,
                        help="startup: cold + warm pairs per mode, each on fresh compile caches (default 1)")
    common.add_argument("--baseline", metavar="DIR",
                        help="startup: also measure the infer tree in DIR (e.g. `git worktree add DIR REV`), "
                             "alternating with this one on the same machine")
    common.add_argument("--tokens", type=int, default=64, help="cpu: new tokens per request (default 64)")
    common.add_argument("--dtypes", nargs="+", choices=cpu.DTYPES, default=list(cpu.DTYPES),
                        help="cpu: parameter dtypes (default bfloat16 float32)")
    common.add_argument("--append", action="store_true",
                        help="keep the rows already in OUT/SCENARIO.json (same device); re-measured rows replace them")
    parser = argparse.ArgumentParser(prog="python -m infer.benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    helps = {"all": "every scenario", "tables": "rebuild markdown, plots and README_table.md from OUT/*.json"}
    for name in SCENARIOS + tuple(helps):
        sub.add_parser(name, parents=[common], help=helps.get(name, f"run the {name} scenario"))
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, scenario: str) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} but CUDA is not available; use --device cpu (with --tiny)")
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
    for flag, values in (("--batch", args.batch), ("--context", args.context), ("--steps", [args.steps])):
        bad = [v for v in values or () if v is not None and v < 1]
        if bad:
            raise SystemExit(f"{flag} takes positive integers, got {bad[0]}")
    if args.baseline is not None:
        try:
            startup.check_baseline(args.baseline)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.tmp is not None:  # created like --out; a file there is refused by name
        tmp = Path(args.tmp)
        if tmp.exists() and not tmp.is_dir():
            raise SystemExit(f"--tmp {args.tmp!r} is not a folder (expected a folder for temporary checkpoints "
                             f"and compile caches, created if missing)")
        tmp.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    shapes = ("tiny",) if args.tiny else tuple(args.shape or DEFAULT_SHAPES[scenario])
    if scenario == "startup" and args.quick and not args.shape and not args.tiny:
        shapes = ("0.6b",)
    batches, contexts = GRID[size]
    if scenario == "cpu":
        device, batches = "cpu", CPU_BATCHES[size]
    return Settings(device=device, out_dir=Path(args.out), shapes=shapes, batches=tuple(args.batch or batches),
                    contexts=tuple(args.context or contexts), steps=args.steps or STEPS[size], quick=args.quick,
                    tiny=args.tiny, modes=tuple(args.modes or ()), hf=not args.no_hf, tmp_dir=args.tmp,
                    append=args.append, python_bytecode=args.python_bytecode,
                    repeat=args.repeat, baseline=args.baseline)


KERNEL_COLUMNS = [Column("kernel", "kernel"), Column("case", "case"), Column("time_us", "us", ".2f"),
                  Column("gbps", "GB/s", ".0f"), Column("of_copy", "of copy", ".0%")]


def run_kernels(settings: Settings) -> Table:
    """Rows of ``benchmarks.fused_kernels.run`` and ``benchmarks.attention_decode.run_case``."""
    table = open_table(settings, "kernels", "Kernels: achieved bandwidth vs a device copy", KERNEL_COLUMNS,
                       ("kernel", "case"))
    if not settings.cuda:
        skipped(table, dict(kernel="fused_kernels"), "Triton kernels need CUDA (CPU run)")
        skipped(table, dict(kernel="attention_decode"), "Triton kernels need CUDA (CPU run)")
        return table
    from . import attention_decode, fused_kernels

    try:
        copy_gbps, results = fused_kernels.run()
        table.meta["fused_copy_gbps"] = copy_gbps
        for r in results:
            table.add(dict(kernel=r.op, case=f"{r.shape[0]} x {r.shape[1]} {r.dtype}", time_us=r.time_us,
                           gbps=r.gb_per_s, of_copy=r.ratio_to_copy))
    except Exception as err:  # noqa: BLE001 - recorded, the attention rows still run
        logger.exception("fused_kernels.run failed")
        table.add(dict(kernel="fused_kernels", status=status_of(err)))
    try:
        copy_gbps = attention_decode.copy_bandwidth_gbps()
    except Exception as err:  # noqa: BLE001
        table.add(dict(kernel="paged decode attention", status=status_of(err)))
        return table
    table.meta["attention_copy_gbps"] = copy_gbps
    from ..runtime.kernels.decode_plan import DecodeConfig
    for batch in (64,) if settings.quick else (64, 256):
        for block in (16,) if settings.quick else (16, 64):
            def case(batch=batch, block=block) -> dict:
                r = attention_decode.run_case(batch, 2048, block, DecodeConfig(), None)
                return dict(time_us=r["time_us"], gbps=r["kv_gbps"], of_copy=r["kv_gbps"] / copy_gbps,
                            splits=r["num_splits"])
            measure(table, dict(kernel="paged decode attention", case=f"batch {batch} ctx 2048 page {block}"), case)
    return table


def plot_kernels(fig, table: Table) -> None:
    ax = fig.subplots()
    rows = ok_rows(table)
    ax.barh([f"{r['kernel']} {r['case']}" for r in rows], [r["of_copy"] for r in rows])
    ax.axvline(1.0, color="k", linestyle="--")
    ax.set_xlabel("achieved GB/s / copy GB/s")
    ax.tick_params(axis="y", labelsize=6)


def _specs() -> dict:
    """Scenario -> (columns, plot function)."""
    return {"floor": (floor.COLUMNS, floor.plot), "decode": (decode.COLUMNS, decode.plot),
            "throughput": (throughput.COLUMNS, throughput.plot), "startup": (startup.COLUMNS, startup.plot),
            "kernels": (KERNEL_COLUMNS, plot_kernels), "cpu": (cpu.COLUMNS, cpu.plot)}


def run_scenario(name: str, args: argparse.Namespace) -> str:
    settings = settings_for(args, name)
    logger.info("=== %s on %s: shapes %s, batches %s, contexts %s", name, settings.device, settings.shapes,
                settings.batches, settings.contexts)
    start = time.perf_counter()
    if name == "floor":
        table = floor.run(settings)
    elif name == "decode":
        table = decode.run(settings)
    elif name == "throughput":
        modes = tuple(args.llm_modes or (("eager",) if not settings.cuda else throughput.DEFAULT_MODES))
        table = throughput.run(settings, llm_modes=modes)
    elif name == "startup":
        table = startup.run(settings, llm_modes=tuple(args.llm_modes or startup.DEFAULT_MODES))
    elif name == "cpu":
        if args.tokens < 1:
            raise SystemExit(f"--tokens takes a positive integer, got {args.tokens}")
        dtypes = ("float32",) if settings.tiny else tuple(args.dtypes)
        table = cpu.run(settings, tokens=8 if settings.tiny else args.tokens, dtypes=dtypes)
    else:
        table = run_kernels(settings)
    table.meta["scenario_s"] = round(time.perf_counter() - start, 1)
    return table.finish(_specs()[name][1])


def rebuild(out: Path, name: str) -> str | None:
    """Markdown and plot of ``out/name.json`` again (e.g. after a run was killed mid-way)."""
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    columns, plot = _specs()[name]
    env = {k: payload.get(k, "n/a") for k in ("device", "date", "torch", "transformers", "triton")}
    table = Table(name, payload.get("title", name), columns, out_dir=out, rows=payload.get("rows", []),
                  notes=payload.get("notes", []), meta=payload.get("meta", {}), env=env)
    if payload.get("partial"):
        table.note("partial: the run stopped before the end of the scenario")
    return table.finish(plot, partial=bool(payload.get("partial")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        stream=sys.stderr)
    out = Path(args.out)
    names = SCENARIOS if args.scenario in ("all", "tables") else (args.scenario,)
    texts: dict[str, str] = {}
    failed = False
    for name in names:
        try:
            text = rebuild(out, name) if args.scenario == "tables" else run_scenario(name, args)
        except Exception as err:  # noqa: BLE001 - one scenario's failure must not cost the others
            logger.exception("scenario %s failed", name)
            text, failed = f"## {name}\n\nfailed: {type(err).__name__}: {err}\n", True
        if text is not None:
            texts[name] = text
    tables = []  # README_table.md: this run's tables, then those that earlier runs left in `out`
    for name in SCENARIOS:
        if name in texts:
            tables.append(texts[name])
        elif (out / f"{name}.md").is_file():
            tables.append((out / f"{name}.md").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "README_table.md").write_text("\n".join(tables))
    print("\n".join(texts[n] for n in names if n in texts), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
