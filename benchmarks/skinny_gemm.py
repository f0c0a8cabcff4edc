"""The Triton skinny GEMM (decode batches of 3-64 rows) against cuBLAS, per projection.

    python -m infer.benchmarks.skinny_gemm [--rows 16 32 64] [--shapes 0.6b smollm2] [--sweep] [--out FILE]

Each case is a chain of ``--layers`` projections of one shape, every one with its own weight (so
that L2 cannot serve them), back to back in one CUDA graph, as in a captured decode step: the
kernel launches with PDL there, and its first weight tile overlaps the launch before it. ``--sweep``
also times a grid of tiles and prints the best, which is how ``skinny_gemm_triton.TUNED`` was set
(shapes not in it stay on cuBLAS in the op layer; the table then shows the rule's tile).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from ..runtime.kernels.skinny_gemm_triton import SkinnyConfig, rule_config, skinny_gemm, tuned_config
from .decode_step import copy_bandwidth
from .harness import graph_ms_per_call, write_rows

SHAPES = {  # model -> projection -> (N, K) of the weight
    "0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "smollm2": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}


def sweep_configs(n: int, k: int) -> list[SkinnyConfig]:
    out = []
    for bn, bk, tma, split in itertools.product((16, 32, 64), (256, 128, 512, 64), (True, False), (1, 2, 4, 8)):
        if n % bn or k % (split * bk) or bn * bk > 16384 or not 32 <= (n // bn) * split <= 1024:
            continue
        out.append(SkinnyConfig(bn, bk, split, tma=tma))
    return out


def label(cfg: SkinnyConfig) -> str:
    return f"{'tma' if cfg.tma else 'ptr'} {cfg.block_n}x{cfg.block_k} split {cfg.split_k} {cfg.num_warps}w {cfg.num_stages}st"


def run_case(n: int, k: int, m: int, layers: int, sweep: bool, seconds: float) -> dict:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    scale = ref.abs().max().item()

    def time_us(cfg: SkinnyConfig | None) -> tuple[float, float]:
        run = (lambda i: F.linear(x, weights[i])) if cfg is None else (
            lambda i: skinny_gemm(x, weights[i], config=cfg))
        err = (run(0).float() - ref).abs().max().item() / scale
        return 1e3 * graph_ms_per_call(run, layers), err

    row = dict(n=n, k=k, rows=m, layers=layers)
    row["cublas_us"], _ = time_us(None)
    chosen = tuned_config(m, n, k)  # None: the op layer keeps cuBLAS for this shape
    row["config"] = label(chosen) if chosen else "cuBLAS (" + label(rule_config(m, n, k)) + ")"
    row["us"], row["rel_err"] = time_us(chosen or rule_config(m, n, k))
    if sweep:
        deadline, tried = time.time() + seconds, []
        for cfg in sweep_configs(n, k):
            if time.time() > deadline:
                break
            try:
                us, err = time_us(cfg)
            except Exception as e:  # noqa: BLE001  (a tile that does not fit in shared memory)
                tried.append(dict(config=label(cfg), error=type(e).__name__))
                continue
            tried.append(dict(config=label(cfg), us=us, rel_err=err))
        ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
        row["sweep"] = ok + [t for t in tried if "error" in t]
        if ok:
            row["best_config"], row["best_us"] = ok[0]["config"], ok[0]["us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["0.6b", "smollm2"])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--seconds", type=float, default=15.0, help="sweep time per case")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("skinny_gemm times CUDA kernels: it needs a GPU")
    copy = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s, chains of {args.layers}")
    print("| model | projection | rows | cuBLAS us | config | us | x cuBLAS | best us | best config |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for model, m in itertools.product(args.shapes, args.rows):
        for name, (n, k) in SHAPES[model].items():
            r = dict(model=model, projection=name, **run_case(n, k, m, args.layers, args.sweep, args.seconds))
            rows.append(r)
            print(f"| {model} | {name} | {m} | {r['cublas_us']:.2f} | {r['config']} | {r['us']:.2f} | "
                  f"{r['us'] / r['cublas_us']:.2f} | {r.get('best_us', float('nan')):.2f} | {r.get('best_config', '')} |",
                  flush=True)
            write_rows(args.out, rows, copy_gbps=copy)


if __name__ == "__main__":
    main()
