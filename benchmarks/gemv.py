"""Skinny GEMM (decode projections) against cuBLAS: achieved weight bandwidth per shape and row count.

    python -m infer.benchmarks.gemv [--rows 1 2 4 8] [--sweep] [--out results.json]
    python -m infer.benchmarks.gemv --chain 28 --rows 1 2 --shapes 0.6b 8b

Each case streams enough weight copies (>= 256 MiB) that L2 cannot serve them, launched inside one
CUDA graph (as in a captured decode step). GB/s counts the weight bytes only. ``--sweep`` also
times a grid of tile configs and prints the best per shape, to tune ``choose_config``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import torch.nn.functional as F

from ..runtime.kernels.tuning import kernel_config, use_kernel_config
from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
from ..runtime.kernels.gemv_triton import GemvConfig, choose_config, gemv
from .decode_step import copy_bandwidth
from .harness import graph_ms_per_call, write_rows

SHAPES = {  # name -> (N, K) of the projection weight
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
    "0.6b lm_head": (151936, 1024),
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (24576, 4096), "8b down": (4096, 12288),
    "8b lm_head": (151936, 4096),
}
SWEEP = [GemvConfig(bn, bk, w, ev) for bn, bk, w, ev in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096),
                                                                          (1, 2, 4, 8), ("", "evict_first"))
         if 2048 <= bn * bk <= 16384]


def _label(cfg: GemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w" + ("/evict_first" if cfg.w_evict else "")


def _prologue_inputs(prologue: str, m: int, k: int) -> tuple[dict, object]:
    """Keyword arguments of ``gemv`` for ``prologue`` and the unfused op chain before the GEMM."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, r, nw = torch.randn(m, k, **bf16), torch.randn(m, k, **bf16), torch.ones(k, **bf16)
    if prologue == "none":
        return dict(x=x), lambda: x
    if prologue == "rms":
        return dict(x=x, prologue="rms", norm_weight=nw, eps=1e-6), \
            lambda: torch.ops.infer.rms_norm(x, nw, 1e-6, True, torch.bfloat16)
    if prologue == "add_rms":
        return dict(x=x, prologue="add_rms", residual=r, norm_weight=nw, eps=1e-6), \
            lambda: torch.ops.infer.fused_add_rms_norm(x, r, nw, 1e-6, True, torch.bfloat16)[0]
    return dict(x=x, prologue="silu_mul", x2=r), lambda: torch.ops.infer.silu_and_mul(x, r)


def run_case(name: str, n: int, k: int, m: int, sweep: bool, prologue: str = "none") -> dict:
    nbytes = n * k * 2
    copies = max(2, -(-(256 << 20) // nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    kwargs, unfused = _prologue_inputs(prologue, m, k)
    x = kwargs.pop("x")
    ref = F.linear(unfused(), weights[0])
    got = gemv(x, weights[0], **kwargs)[0]
    err = (got.float() - ref.float()).abs().max().item()
    row = dict(shape=name, N=n, K=k, rows=m, prologue=prologue, max_abs_err=err)
    row["cublas_us"] = 1e3 * graph_ms_per_call(lambda i: F.linear(unfused(), weights[i]), copies)
    cfg = choose_config(m, n, k, x.device, prologue)
    row["gemv_us"] = 1e3 * graph_ms_per_call(lambda i: gemv(x, weights[i], config=cfg, **kwargs), copies)
    row["config"] = _label(cfg)
    if sweep:
        timed = [(1e3 * graph_ms_per_call(lambda i: gemv(x, weights[i], config=c, **kwargs), copies), c)
                 for c in SWEEP]
        best = min(timed, key=lambda t: t[0])
        row["best_us"], row["best_config"] = best[0], _label(best[1])
    for key in ("cublas", "gemv", "best"):
        if f"{key}_us" in row:
            row[f"{key}_gbps"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e9
    del weights
    return row


LAYER_SHAPES = {  # per decoder layer: (name, N, K, prologue) in step order
    "0.6b": [("qkv", 4096, 1024, "add_rms"), ("o", 1024, 2048, "none"), ("gate_up", 6144, 1024, "add_rms"),
             ("down", 1024, 3072, "silu_mul")],
    "8b": [("qkv", 6144, 4096, "add_rms"), ("o", 4096, 4096, "none"), ("gate_up", 24576, 4096, "add_rms"),
           ("down", 4096, 12288, "silu_mul")],
}


def run_chain(shape: str, layers: int, m: int) -> dict:
    """A decode step's projections only: ``layers`` x (qkv, o, gate_up, down) with their prologues,
    every layer its own weights, back to back in one CUDA graph; PDL on and off, and cuBLAS."""
    specs = LAYER_SHAPES[shape]
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _, n, k, _ in specs]
               for _ in range(layers)]
    inputs = {name: _prologue_inputs(prologue, m, k) for name, _, k, prologue in specs}
    nbytes = layers * sum(n * k * 2 for _, n, k, _ in specs)

    def ours(i: int) -> None:
        for (name, *_), w in zip(specs, weights[i]):
            kwargs = dict(inputs[name][0])
            gemv(kwargs.pop("x"), w, **kwargs)

    def cublas(i: int) -> None:
        for (name, *_), w in zip(specs, weights[i]):
            F.linear(inputs[name][1](), w)

    row = dict(shape=shape, layers=layers, rows=m, weight_mb=nbytes / 1e6)
    for label, pdl in (("gemv_pdl", True), ("gemv_nopdl", False)):
        with use_kernel_config(dataclasses.replace(kernel_config(), pdl=pdl)):
            row[f"{label}_us"] = 1e3 * layers * graph_ms_per_call(ours, layers)
    row["cublas_us"] = 1e3 * layers * graph_ms_per_call(cublas, layers)
    for key in ("gemv_pdl", "gemv_nopdl", "cublas"):
        row[f"{key}_gbps"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--prologue", nargs="+", default=["none"], choices=("none", "rms", "add_rms", "silu_mul"))
    parser.add_argument("--chain", type=int, default=0, metavar="LAYERS",
                        help="time LAYERS decoder layers' projections back to back (PDL on/off, cuBLAS)")
    parser.add_argument("--out")
    args = parser.parse_args()
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s")
    if args.chain:
        print("| shape | layers | rows | weights MB | gemv+PDL us | of copy | gemv us | of copy | cuBLAS us | of copy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = []
        for shape, m in itertools.product([s for s in LAYER_SHAPES if any(n.startswith(s) for n in args.shapes)],
                                          args.rows):
            r = run_chain(shape, args.chain, m)
            rows.append(r)
            print(f"| {shape} | {args.chain} | {m} | {r['weight_mb']:.0f} | " + " | ".join(
                f"{r[k + '_us']:.1f} | {r[k + '_gbps'] / copy:.0%}" for k in ("gemv_pdl", "gemv_nopdl", "cublas"))
                + " |", flush=True)
            write_rows(args.out, rows, copy_gbps=copy)
        return
    print("| shape | prologue | rows | unfused us | GB/s | gemv us | GB/s | of copy | config | best us | best config | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, prologue, m in itertools.product(args.shapes, args.prologue, args.rows):
        r = run_case(name, *SHAPES[name], m, args.sweep, prologue)
        rows.append(r)
        print(f"| {name} | {prologue} | {m} | {r['cublas_us']:.1f} | {r['cublas_gbps']:.0f} | {r['gemv_us']:.1f} | "
              f"{r['gemv_gbps']:.0f} | {r['gemv_gbps'] / copy:.0%} | {r['config']} | "
              f"{r.get('best_us', float('nan')):.1f} | {r.get('best_config', '')} | {r['max_abs_err']:.3g} |",
              flush=True)
        write_rows(args.out, rows, copy_gbps=copy)


if __name__ == "__main__":
    main()
