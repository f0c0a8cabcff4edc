"""Where a decode step's time goes outside the weight streams: the step timed with one kind of
small kernel not launched.

    python -m infer.benchmarks.step_breakdown --shape 8b --batch 1 [--context 512] [--out FILE]

Each row times the same decode step (full decode graph, forward + LM head, as ``decode_step``)
with the Triton kernels of one kind replaced by launches that do nothing. What the step then
computes is garbage and only its time means anything: a row is an upper bound on what fusing or
hiding that kind of kernel could save, never a result. The GEMV/GEMM weight streams are untouched,
so the last row ("all") is roughly the step's projections and LM head alone.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from collections.abc import Iterator, Sequence

import torch

from .decode_step import BLOCK, MODES, build, copy_bandwidth, floor_bytes, time_mode

# kind -> the kernels (module under infer.runtime.kernels, attribute) that stand for it
KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "rms_norm": (("norm_triton", "_rms_norm_kernel"),),
    "qk_norm_rotary": (("rotary_triton", "_qk_rotary_kernel"),),
    "silu_and_mul": (("activation_triton", "_silu_and_mul_kernel"),),
    "decode_reduce": (("decode_attention_triton", "_decode_reduce_kernel"),),
    "decode_attention": (("decode_attention_triton", "_decode_partial_kernel"),
                         ("decode_attention_triton", "_decode_reduce_kernel")),
}
ROWS = ("none", *KINDS, "all")


class _NoLaunch:
    """Takes a Triton launch (``kernel[grid](...)``) and does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_skipped(kinds: Sequence[str]) -> Iterator[None]:
    """Within the block, the kernels of ``kinds`` are not launched (restored afterwards)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kernel kinds {unknown}; expected some of {sorted(KINDS)}")
    saved = []
    try:
        for kind in kinds:
            for module_name, attr in KINDS[kind]:
                module = importlib.import_module(f"infer.runtime.kernels.{module_name}")
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, _NoLaunch())
        yield
    finally:
        for module, attr, kernel in reversed(saved):
            setattr(module, attr, kernel)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--mode", choices=[m for m in MODES if m.startswith("full-")], default="full-eager")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_breakdown times CUDA kernels: it needs a GPU")
    bw = copy_bandwidth()
    model, cfg = build(args.shape, args.batch * ((args.context + BLOCK) // BLOCK + 1))
    floor_ms = floor_bytes(model, cfg, args.batch, args.context) / (bw * 1e9) * 1e3
    rows = []
    for row in args.rows:
        kinds = [] if row == "none" else list(KINDS) if row == "all" else [row]
        with kernels_skipped(kinds):
            ms, _ = time_mode(model, MODES[args.mode], args.batch, args.context, logits=True)
        rows.append(dict(skipped=row, ms=ms))
        print(f"{row}: {ms:.3f} ms/step", flush=True)
    base = rows[0]["ms"] if rows[0]["skipped"] == "none" else None
    lines = [f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s; {args.shape}, batch "
             f"{args.batch}, context {args.context}, {args.mode}; floor {floor_ms:.3f} ms", "",
             "| not launched | ms/step | x floor | saved ms |", "|---|---|---|---|"]
    for r in rows:
        saved = "" if base is None else f"{base - r['ms']:.3f}"
        lines.append(f"| {r['skipped']} | {r['ms']:.3f} | {r['ms'] / floor_ms:.3f} | {saved} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(copy_gbps=bw, floor_ms=floor_ms, shape=args.shape, batch=args.batch,
                           context=args.context, mode=args.mode, rows=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
