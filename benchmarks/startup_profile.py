"""Where ``LLM(...)`` spends its startup: cProfile of one engine construction and first token.

    python -m infer.benchmarks.startup_profile [--shape 0.6b] [--mode inductor|eager] [--rows 40]

Run it in a fresh process with empty (cold) or reused (warm) ``TORCHINDUCTOR_CACHE_DIR`` /
``TRITON_CACHE_DIR``; the engine's INFO log lines carry timestamps.
"""
from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import tempfile
import time
from pathlib import Path

from .decode_step import qwen3_config
from .hf_baselines import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--mode", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--checkpoint", help="reuse this checkpoint folder (written if missing)")
    parser.add_argument("--out", help="write the raw profile here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("infer").setLevel(logging.INFO)
    from ..runtime.engine.llm import LLM
    from ..runtime.engine.sampling import SamplingParams

    folder = Path(args.checkpoint or tempfile.mkdtemp(prefix="infer-ckpt-"))
    if not (folder / "config.json").is_file():
        save_checkpoint(qwen3_config(args.shape), folder, "cuda")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    llm = LLM(str(folder), dtype="bfloat16", max_model_len=4096, max_num_seqs=args.max_num_seqs,
              compile_options={"inner_compiler": args.mode})
    init_s = time.perf_counter() - start
    llm.generate([list(range(3, 19))], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    profiler.disable()
    total_s = time.perf_counter() - start
    print(f"LLM() {init_s:.1f} s, to first token {total_s:.1f} s, capture {llm.capture_seconds:.1f} s")
    stats = pstats.Stats(profiler)
    if args.out:
        stats.dump_stats(args.out)
    stats.sort_stats("cumulative").print_stats(args.rows)
    stats.sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
