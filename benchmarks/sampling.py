"""Sampling at a shared temperature without top-k / top-p: the torch exponential race against the
Triton Gumbel-max kernel, per row count.

    python -m infer.benchmarks.sampling --rows 1 8 64 256 --vocab 151936 [--dtype bf16] [--sweep] [--out f.json]

``torch`` is the eager path the kernel replaces (fp32 copy, divide, softmax, ``exponential_``,
clamp, divide, argmax); ``kernel`` is what :func:`sample` runs now (host seed draw included). Each
is timed per call with CUDA events (median), on rotating logits copies (>= 256 MiB, so that L2
cannot serve them). GB/s counts the logits read once (rows x vocab x element size): the kernel's
traffic, a fraction of the torch path's. ``host us`` is the launch cost on the CPU, which hides
behind the GPU when it is busy. ``--sweep`` also times a grid of kernel configs, to tune
``choose_config``. ``ref`` says whether the kernel's tokens of the first rows equal the plain-torch
reference on the same noise.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from ..runtime.engine import sampler
from ..runtime.engine.sampling import SamplingParams
from ..runtime.kernels.sampling_triton import SamplingConfig, choose_config, gumbel_sample, reference_sample
from .decode_step import copy_bandwidth
from .harness import write_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP_BLOCKS, SWEEP_WARPS, SWEEP_SPLITS = (512, 1024, 2048, 4096), (2, 4, 8), (1, 2, 3, 4, 8, 16, 32, 64, 128)
MAX_COPIES = 1024
CHECK_ROWS = 8  # rows checked against the CPU reference (it takes seconds per row at full vocab)


def _median_us(fn, copies: list[torch.Tensor], iters: int) -> tuple[float, float]:
    """Median GPU microseconds of ``fn(x)`` per call (CUDA events) and mean host microseconds."""
    for x in copies[:3]:
        fn(x)
    torch.cuda.synchronize()
    gpu, host = [], []
    for i in range(iters):
        x = copies[i % len(copies)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn(x)
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3)
    return statistics.median(gpu), statistics.mean(host)


def run_case(rows: int, vocab: int, dtype: torch.dtype, temperature: float, iters: int, sweep: bool) -> dict:
    nbytes = rows * vocab * dtype.itemsize
    copies = [(torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
              for _ in range(min(MAX_COPIES, max(2, -(-(256 << 20) // nbytes))))]
    params = SamplingParams(temperature=temperature)
    cfg = choose_config(rows, vocab, copies[0].device)
    row = dict(rows=rows, vocab=vocab, dtype=str(dtype).removeprefix("torch."), temperature=temperature,
               config=f"{cfg.block}x{cfg.splits}/{cfg.num_warps}w", logits_mb=nbytes / 1e6)
    row["torch_us"], row["torch_host_us"] = _median_us(lambda x: sampler._race_shared(x.float(), params), copies, iters)
    row["kernel_us"], row["kernel_host_us"] = _median_us(lambda x: sampler._sample_shared(x, params), copies, iters)
    seed = 0x5EED | (1 << 62)
    check = copies[0][:CHECK_ROWS]
    row["ref"] = gumbel_sample(copies[0], temperature, seed)[:CHECK_ROWS].tolist() == \
        reference_sample(check, temperature, seed).tolist()
    if sweep:
        configs = [SamplingConfig(b, s, w) for b, w, s in itertools.product(SWEEP_BLOCKS, SWEEP_WARPS, SWEEP_SPLITS)
                   if s <= -(-vocab // b) and rows * s <= 4096]
        timed = [(_median_us(lambda x: gumbel_sample(x, temperature, seed, c), copies, iters)[0], c) for c in configs]
        best_us, best = min(timed, key=lambda t: t[0])
        row["best_us"], row["best_config"] = best_us, f"{best.block}x{best.splits}/{best.num_warps}w"
    for key in ("torch", "kernel", "best"):
        if f"{key}_us" in row:
            row[f"{key}_gbps"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e9
    del copies
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel configs")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the sampling benchmark needs CUDA")
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s")
    print("| rows | dtype | logits MB | torch us | GB/s | kernel us | GB/s | of copy | speedup | config "
          "| host us torch / kernel | best us | best config | ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype, m in itertools.product(args.dtype, args.rows):
        r = run_case(m, args.vocab, DTYPES[dtype], args.temperature, args.iters, args.sweep)
        rows.append(r)
        print(f"| {m} | {dtype} | {r['logits_mb']:.1f} | {r['torch_us']:.1f} | {r['torch_gbps']:.0f} | "
              f"{r['kernel_us']:.1f} | {r['kernel_gbps']:.0f} | {r['kernel_gbps'] / copy:.0%} | "
              f"{r['torch_us'] / r['kernel_us']:.1f}x | {r['config']} | "
              f"{r['torch_host_us']:.0f} / {r['kernel_host_us']:.0f} | {r.get('best_us', float('nan')):.1f} | "
              f"{r.get('best_config', '')} | {'ok' if r['ref'] else 'MISMATCH'} |", flush=True)
        write_rows(args.out, rows, copy_gbps=copy)


if __name__ == "__main__":
    main()
