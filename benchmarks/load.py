"""Checkpoint loading: ``load_model(...)`` on a random bf16 Qwen3 checkpoint, streamed vs simple path.

``python -m infer.benchmarks.load --shape 8b --out DIR`` writes the checkpoint into ``DIR`` (with
:func:`~infer.benchmarks.hf_baselines.save_checkpoint`, as the startup scenario does; an existing
checkpoint in ``DIR`` is reused unless ``--rewrite``), reads every file once so that the page cache
is warm, then times ``load_model(DIR, "bfloat16", device)`` ``--repeats`` times per path
(``fast=True``: :func:`~infer.models.streaming.stream_weights`; ``fast=False``: the simple
:func:`~infer.models.checkpoint.load_weights`), interleaved, and prints the median seconds and GB/s
(checkpoint bytes / seconds, model construction included). CUDA context creation and
transformers' first-use imports happen before the timed loads. Every run is printed: the first
streamed one also pays for pinning the staging buffers, which later runs find in torch's cache.
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from ..models import streaming
from ..models.loader import checkpoint_files, load_model
from .decode_step import SHAPES, qwen3_config
from .hf_baselines import save_checkpoint

logger = logging.getLogger(__name__)

PATHS = {"fast": True, "simple": False}
WARM_READ_BYTES = 64 << 20


def ensure_checkpoint(shape: str, folder: Path, device: str, rewrite: bool = False) -> Path:
    """A random bf16 checkpoint of ``shape`` in ``folder`` (written unless one is already there)."""
    if not rewrite and (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        logger.info("reusing the checkpoint in %s", folder)
        return folder
    save_checkpoint(qwen3_config(shape), folder, device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def warm_page_cache(files: list[Path]) -> int:
    """Read every file once (so timed loads find the page cache warm); returns the bytes read."""
    total = 0
    buffer = bytearray(WARM_READ_BYTES)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def time_load(folder: Path, device: str, fast: bool, staging: streaming.StagingConfig | None = None) -> float:
    """Seconds of one ``load_model`` (it synchronises the device before returning)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model, _ = load_model(folder, dtype="bfloat16", device=device, fast=fast, staging=staging)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--out", required=True, help="checkpoint folder (written, or reused if it holds one)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per path (median reported)")
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=["fast", "simple"])
    parser.add_argument("--rewrite", action="store_true", help="write a new checkpoint even if OUT holds one")
    default = streaming.StagingConfig()
    parser.add_argument("--staging-mib", type=int, default=default.buffer_bytes >> 20, help="staging buffer MiB")
    parser.add_argument("--buffers", type=int, default=default.buffers, help="staging buffers")
    parser.add_argument("--threads", type=int, default=default.read_threads, help="read threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    staging = streaming.StagingConfig(args.staging_mib << 20, args.buffers, args.threads)

    folder = ensure_checkpoint(args.shape, Path(args.out), device, args.rewrite)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context creation stays out of the timed loads
    from transformers import AutoConfig

    AutoConfig.from_pretrained(str(folder))  # so do transformers' first-use imports (~0.5-2 s)
    start = time.perf_counter()
    total = warm_page_cache(checkpoint_files(folder))
    warm_s = time.perf_counter() - start
    print(f"{args.shape}: {total / 1e9:.2f} GB in {len(checkpoint_files(folder))} files; page-cache read "
          f"{warm_s:.2f} s ({total / 1e9 / warm_s:.1f} GB/s, one thread)")
    print(f"staging {staging.buffers} x {staging.buffer_bytes >> 20} MiB, {staging.read_threads} read threads")
    times: dict[str, list[float]] = {name: [] for name in args.paths}
    for _ in range(args.repeats):
        for name in args.paths:
            times[name].append(time_load(folder, device, PATHS[name], staging))
    for name, runs in times.items():
        median = statistics.median(runs)
        runs_text = ", ".join(f"{t:.2f}" for t in runs)
        print(f"{name:>6} ({device}): median {median:.2f} s, {total / 1e9 / median:.1f} GB/s  [runs: {runs_text} s]")
    if "fast" in times and "simple" in times:
        print(f"speed-up: {statistics.median(times['simple']) / statistics.median(times['fast']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
