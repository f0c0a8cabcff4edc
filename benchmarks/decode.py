"""Decode step time per (shape, batch, context, mode), against the floor and the Hugging Face paths.

A step decodes one token for each of ``batch`` sequences that already hold ``context`` tokens,
LM head included. Our ``full-*`` modes capture compiled ``forward`` + ``compute_logits`` in one CUDA
graph and replay it, as the engine's ModelRunner does; piecewise modes run the LM head eager. Our modes go through ``decode_step.time_mode`` (a fresh compile per row, CUDA graphs
captured for exactly ``batch``); the HF modes through :mod:`.hf_baselines`. Reported: median ms,
tokens/s, achieved GB/s (floor bytes / time) and the ratio to the floor.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from . import hf_baselines
from .decode_step import BLOCK, MODES, bind_kv, build, qwen3_config, time_mode
from .floor import copy_bandwidth, floor_bytes
from .harness import (Column, Settings, Table, measure, ok_rows, open_table, release_memory, skipped,
                      status_of)

logger = logging.getLogger(__name__)

DEFAULT_MODES = ("piecewise-inductor", "full-inductor", "full-eager", "hf-eager", "hf-static-compiled")
HF_MODES = {"hf-eager": hf_baselines.time_hf_eager, "hf-static-compiled": hf_baselines.time_hf_static_compiled}
ALL_MODES = tuple(MODES) + tuple(HF_MODES)

COLUMNS = [Column("shape", "shape"), Column("mode", "mode"), Column("batch", "batch"), Column("context", "context"),
           Column("ms", "ms/step", ".3f"), Column("tok_s", "tokens/s", ".0f"), Column("gbps", "GB/s", ".0f"),
           Column("floor_ms", "floor ms", ".3f"), Column("x_floor", "x floor", ".2f"),
           Column("startup_s", "first 3 calls s", ".1f")]


def _cpu_skip(mode: str) -> str | None:
    """Why ``mode`` is not run on CPU (None: it runs)."""
    if mode == "hf-static-compiled":
        return "reduce-overhead CUDA graphs need CUDA (CPU run)"
    options = MODES.get(mode)
    if options and options.get("inner_compiler", "inductor") == "inductor":
        return "Inductor modes need CUDA here (CPU run: slow C++ compile)"
    return None


def _result(ms: float, startup: float, batch: int, nbytes: int, floor: float) -> dict[str, Any]:
    return dict(ms=ms, tok_s=batch / ms * 1e3, gbps=nbytes / (ms * 1e-3) / 1e9, x_floor=ms / floor,
                startup_s=startup)


def run(settings: Settings, copy_gbps: float | None = None) -> Table:
    table = open_table(settings, "decode", "Decode step: ms per step vs the floor (random-weight Qwen3 shapes, bf16)",
                       COLUMNS, ("shape", "mode", "batch", "context"))
    copy_gbps = copy_gbps or copy_bandwidth(settings.device)
    modes = settings.modes or DEFAULT_MODES
    if not settings.hf:
        modes = tuple(m for m in modes if m not in HF_MODES)
    unknown = sorted(set(modes) - set(ALL_MODES))
    if unknown:
        raise ValueError(f"unknown decode modes {unknown}; known: {list(ALL_MODES)}")
    table.meta.update(copy_gbps=copy_gbps, steps=settings.steps, block_size=BLOCK)
    table.note("ours: fresh compile per row, CUDA graphs for exactly `batch`; full-* modes: forward + LM head in "
               "one engine-style graph, piecewise: LM head eager; x floor = ms / floor ms; GB/s = floor bytes / time")
    for shape in settings.shapes:
        cfg = qwen3_config(shape)
        ours = [m for m in modes if m in MODES]
        if ours:
            _model_rows(table, settings, shape, cfg, ours, copy_gbps, _ours)
        hf = [m for m in modes if m in HF_MODES]
        if hf:
            _model_rows(table, settings, shape, cfg, hf, copy_gbps, _hf)
    return table


def _model_rows(table: Table, settings: Settings, shape: str, cfg: Any, modes: list[str], copy_gbps: float,
                runner: Callable) -> None:
    """Build one model (ours or HF), then one row per (batch, context, mode); the model is freed after."""
    model, failure = None, None
    try:
        model = build(shape, 0, settings.device)[0] if runner is _ours else \
            hf_baselines.build_hf_model(cfg, settings.device)
    except Exception as err:  # noqa: BLE001 - every row of this model records it
        logger.exception("building the %s model", shape)
        failure = status_of(err)
    for batch in settings.batches:
        for context in settings.contexts:
            nbytes = floor_bytes(cfg, batch, context)
            floor = nbytes / (copy_gbps * 1e9) * 1e3
            runner(table, settings, model, failure, modes, dict(shape=shape, batch=batch, context=context,
                                                                floor_ms=floor), nbytes)
    del model
    torch._dynamo.reset()
    release_memory()


def _ours(table: Table, settings: Settings, model, failure: str | None, modes: list[str], base: dict[str, Any],
          nbytes: int) -> None:
    batch, context = base["batch"], base["context"]
    if failure is None:
        try:
            bind_kv(model, batch * -(-(context + 1) // BLOCK), settings.device)
        except Exception as err:  # noqa: BLE001
            failure = status_of(err)
            release_memory()

    def timed(mode: str) -> dict[str, Any]:
        try:
            ms, startup = time_mode(model, MODES[mode], batch, context, settings.steps, settings.device, logits=True)
        finally:
            torch._dynamo.reset()  # drops the graphs that hold the KV cache
        return _result(ms, startup, batch, nbytes, base["floor_ms"])

    _measure_modes(table, settings, failure, modes, base, timed)
    if model is not None:
        bind_kv(model, 1, settings.device)  # frees this row's KV before the next is allocated


def _hf(table: Table, settings: Settings, model, failure: str | None, modes: list[str], base: dict[str, Any],
        nbytes: int) -> None:
    batch, context = base["batch"], base["context"]

    def timed(mode: str) -> dict[str, Any]:
        ms, startup, extra = _time_hf(table, mode, model, batch, context, settings)
        return dict(_result(ms, startup, batch, nbytes, base["floor_ms"]), **extra)

    _measure_modes(table, settings, failure, modes, base, timed)


def _measure_modes(table: Table, settings: Settings, failure: str | None, modes: list[str], base: dict[str, Any],
                   timed) -> None:
    """One row per mode: the shared failure, a CPU skip, or `timed(mode)` measured."""
    for mode in modes:
        row = dict(base, mode=mode)
        why = None if settings.cuda else _cpu_skip(mode)
        if failure is not None:
            table.add(dict(row, status=failure))
        elif why:
            skipped(table, row, why)
        else:
            measure(table, row, lambda mode=mode: timed(mode))


def _time_hf(table: Table, mode: str, model, batch: int, context: int, settings: Settings):
    """``(ms, startup, extra fields)``; the static path retries with graph breaks allowed if fullgraph fails."""
    try:
        return (*HF_MODES[mode](model, batch, context, settings.steps, settings.device), {})
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - fullgraph=True can fail on a transformers version
        if mode != "hf-static-compiled":
            raise
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        logger.warning("hf-static-compiled with fullgraph=True failed (%s); retrying with fullgraph=False", reason)
        release_memory()
    table.note("hf-static-compiled rows with fullgraph=False: fullgraph=True failed (see the rows' `fullgraph_error`)")
    ms, startup = hf_baselines.time_hf_static_compiled(model, batch, context, settings.steps, settings.device,
                                                       fullgraph=False)
    return ms, startup, {"fullgraph": False, "fullgraph_error": reason}


def plot(fig, table: Table) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in table.rows))
    contexts = list(dict.fromkeys(r["context"] for r in table.rows))
    axes = fig.subplots(len(shapes), len(contexts), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, context in enumerate(contexts):
            ax = axes[i][j]
            rows = [r for r in table.rows if r["shape"] == shape and r["context"] == context]
            floor = {r["batch"]: r["floor_ms"] for r in rows}
            ax.plot(sorted(floor), [floor[b] for b in sorted(floor)], "k--", label="floor")
            for mode in dict.fromkeys(r["mode"] for r in rows):
                got = sorted(ok_rows(table, shape=shape, context=context, mode=mode), key=lambda r: r["batch"])
                if got:
                    ax.plot([r["batch"] for r in got], [r["ms"] for r in got], "o-", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}, context {context}", fontsize=8)
            ax.set_xlabel("batch")
            ax.set_ylabel("ms / step")
            ax.legend(fontsize=6)
