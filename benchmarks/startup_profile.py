"""Where ``LLM(...)`` spends its startup: a profile of one engine construction and first token.

    python -m infer.benchmarks.startup_profile [--shape 0.6b] [--mode inductor|eager] [--rows 40] [--sample]

``--sample`` reads the main thread's stack every few milliseconds from another thread instead of
running cProfile: wall time at almost no overhead, time spent waiting for the GIL included (the
Triton compile pool holds it in its Python front end), which cProfile cannot attribute.

Run it in a fresh process with empty (cold) or reused (warm) ``TORCHINDUCTOR_CACHE_DIR`` /
``TRITON_CACHE_DIR``; the engine's INFO log lines carry timestamps.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import logging
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

from .decode_step import qwen3_config
from .hf_baselines import save_checkpoint


class StackSampler:
    """Samples one thread's Python stack every ``interval`` seconds (wall time, GIL waits included)."""

    def __init__(self, thread_id: int, interval: float = 0.005) -> None:
        self.thread_id, self.interval = thread_id, interval
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self) -> "StackSampler":
        self._elapsed = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._elapsed = time.perf_counter() - self._elapsed

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            stack = []
            while frame is not None:
                code = frame.f_code
                stack.append(f"{Path(code.co_filename).name}:{code.co_firstlineno}:{code.co_name}")
                frame = frame.f_back
            self.stacks[tuple(reversed(stack))] += 1

    def report(self, rows: int) -> str:
        """Functions by inclusive and by own (innermost frame) share of the samples."""
        total = sum(self.stacks.values()) or 1
        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        for stack, count in self.stacks.items():
            for name in set(stack):
                inclusive[name] += count
            if stack:
                own[stack[-1]] += count
        per = self._elapsed / total  # seconds a sample stands for (the sampler waits for the GIL too)
        lines = [f"{total} samples over {self._elapsed:.1f} s", "inclusive:"]
        lines += [f"  {c / total:6.1%} {c * per:6.2f}s  {name}" for name, c in inclusive.most_common(rows)]
        lines.append("own:")
        lines += [f"  {c / total:6.1%} {c * per:6.2f}s  {name}" for name, c in own.most_common(rows)]
        return "\n".join(lines)

    def collapsed(self) -> str:
        """One line per distinct stack, ``outer;...;inner count`` (flame-graph input)."""
        return "\n".join(f"{';'.join(stack)} {count}" for stack, count in self.stacks.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--mode", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--checkpoint", help="reuse this checkpoint folder (written if missing)")
    parser.add_argument("--out", help="write the raw profile here (cProfile), or the collapsed stacks (--sample)")
    parser.add_argument("--sample", action="store_true", help="sample the main thread's stack instead of cProfile")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("infer").setLevel(logging.INFO)
    from ..runtime.engine.llm import LLM
    from ..runtime.engine.sampling import SamplingParams

    folder = Path(args.checkpoint or tempfile.mkdtemp(prefix="infer-ckpt-"))
    if not (folder / "config.json").is_file():
        save_checkpoint(qwen3_config(args.shape), folder, "cuda")
    def start_engine():
        llm = LLM(str(folder), dtype="bfloat16", max_model_len=4096, max_num_seqs=args.max_num_seqs,
                  compile_options={"inner_compiler": args.mode})
        init_s = time.perf_counter() - start
        llm.generate([list(range(3, 19))], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        return llm, init_s

    start = time.perf_counter()
    if args.sample:
        with StackSampler(threading.get_ident()) as sampler:
            llm, init_s = start_engine()
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        llm, init_s = start_engine()
        profiler.disable()
    total_s = time.perf_counter() - start
    print(f"LLM() {init_s:.1f} s, to first token {total_s:.1f} s, capture {llm.capture_seconds:.1f} s")
    if args.sample:
        print(sampler.report(args.rows))
        if args.out:
            Path(args.out).write_text(sampler.collapsed() + "\n")
        return
    stats = pstats.Stats(profiler)
    if args.out:
        stats.dump_stats(args.out)
    stats.sort_stats("cumulative").print_stats(args.rows)
    stats.sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
