"""Host (CPU) time per decode step of the engine's Python paths, without a model.

    python -m infer.benchmarks.engine_overhead [--seqs 256] [--steps 90] [--sample-steps 3] [--out FILE]

The throughput workload (256 sequences, prompts of 100-1024 random ids, ``ignore_eos``, temperature
0.6) is admitted and prefilled through a real :class:`Scheduler` and :class:`BlockManager` with
fake sampled tokens; then every decode step times, on CPU: ``schedule()``, the full-graph decode
prepare (the runner's fill of the static :class:`DecodeBuffers` of the padded size, CPU tensors),
the sampler and ``postprocess()``. The sampler is GPU work in the engine, so it is reported apart:
once at the real vocabulary (``--sample-steps`` steps, CPU kernels dominate) and once at a vocabulary
of 16 (every step), where what is left is its Python and dispatch overhead. No sequence finishes
inside the timed steps (outputs are at least 100 tokens), so the batch stays at ``--seqs``.

A second table times the same workload, freshly prefilled, with async scheduling: each step is
built by ``schedule_ahead()`` while the step before is in flight, prepared without its ids (the
runner copies them on the device, here a CPU tensor copy), and the step before is postprocessed
after that. On CUDA all of this overlaps the running step's device work.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..runtime.engine.block_manager import BlockManager
from ..runtime.graphs import capture_sizes
from ..runtime.engine.decode_buffers import DecodeBuffers
from ..runtime.engine.model_runner import fill_decode_buffers
from ..runtime.engine.sampler import sample
from ..runtime.engine.sampling import SamplingParams
from ..runtime.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from ..runtime.engine.sequence import Sequence

VOCAB = 151936  # Qwen3
SMALL_VOCAB = 16
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096
MAX_BATCHED_TOKENS = 16384
PHASES = ("schedule", "prepare", "postprocess", "sample_host", "sample_full")
HOST_PHASES = ("schedule", "prepare", "postprocess", "sample_host")
AHEAD_PHASES = ("schedule_ahead", "prepare_ahead", "postprocess")


def build_scheduler(num_seqs: int, num_blocks: int, seed: int) -> Scheduler:
    """A scheduler holding the throughput workload, every sequence waiting."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=MAX_BATCHED_TOKENS,
                             max_model_len=MAX_MODEL_LEN)
    sched = Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE), eos_token_ids=[VOCAB - 1])
    for i in range(num_seqs):
        prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024))
        sched.add(Sequence(i, prompt, params))
    return sched


def fake_tokens(batch: ScheduledBatch, gen: torch.Generator) -> torch.Tensor:
    """``[N] int64`` random ids, one per sampling entry, on CPU like the runner's result."""
    n = sum(1 for e in batch.entries if e.sample)
    return torch.randint(0, 10000, (n,), generator=gen)


def prefill(sched: Scheduler, gen: torch.Generator) -> int:
    """Run prefill steps until the first decode batch would come; returns the prefill step count."""
    steps = 0
    while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
        batch = sched.schedule()
        if not batch.is_prefill:
            raise RuntimeError(f"expected a prefill batch at step {steps}, got decode")
        sched.postprocess(batch, fake_tokens(batch, gen))
        steps += 1
    return steps


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def sample_inputs(batch: ScheduledBatch) -> tuple[list[SamplingParams], list[torch.Generator | None]]:
    """The runner's per-step sampler arguments."""
    seqs = [e.seq for e in batch.entries if e.sample]
    return [s.params for s in seqs], [s.generator for s in seqs]


def decode_steps(sched: Scheduler, steps: int, sample_steps: int, gen: torch.Generator) -> dict[str, list[float]]:
    """Seconds per phase of each timed decode step."""
    n = len(sched.running)
    size = capture_sizes(n)[-1]
    buffers = DecodeBuffers.allocate(size, -(-MAX_MODEL_LEN // BLOCK_SIZE), MAX_MODEL_LEN, "cpu")
    small = torch.randn(n, SMALL_VOCAB, generator=gen)
    full = torch.randn(n, VOCAB, generator=gen)
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for step in range(steps + 1):  # step 0 warms up
        batch, t_schedule = timed(sched.schedule)
        if batch.is_prefill or len(batch.entries) != n:
            raise RuntimeError(f"step {step}: expected a decode batch of {n}, got {len(batch.entries)} entries")
        _, t_prepare = timed(lambda: fill_decode_buffers(buffers, batch.entries, BLOCK_SIZE))
        _, t_host = timed(lambda: sample(small, *sample_inputs(batch)))
        if step and step <= sample_steps:
            _, t_full = timed(lambda: sample(full, *sample_inputs(batch)))
            times["sample_full"].append(t_full)
        tokens = fake_tokens(batch, gen)
        _, t_post = timed(lambda: sched.postprocess(batch, tokens))
        if step:
            for phase, t in zip(PHASES, (t_schedule, t_prepare, t_post, t_host)):
                times[phase].append(t)
    return times


def ahead_steps(sched: Scheduler, steps: int, gen: torch.Generator) -> dict[str, list[float]]:
    """Seconds per host phase of each decode step scheduled ahead (async scheduling)."""
    n = len(sched.running)
    size = capture_sizes(n)[-1]
    buffers = DecodeBuffers.allocate(size, -(-MAX_MODEL_LEN // BLOCK_SIZE), MAX_MODEL_LEN, "cpu")
    prev = sched.schedule()
    sampled = fake_tokens(prev, gen)  # the step in flight's tokens, "on the device"
    times: dict[str, list[float]] = {phase: [] for phase in AHEAD_PHASES}
    for step in range(steps + 1):  # step 0 warms up
        batch, t_schedule = timed(lambda: sched.schedule_ahead(prev))
        if batch is None or len(batch.entries) != n:
            raise RuntimeError(f"step {step}: expected a decode batch of {n} scheduled ahead, got {batch}")

        def prepare() -> None:
            fill_decode_buffers(buffers, batch.entries, BLOCK_SIZE, with_ids=False)
            buffers.input_ids[:n].copy_(sampled)

        _, t_prepare = timed(prepare)
        _, t_post = timed(lambda: sched.postprocess(prev, sampled))
        prev, sampled = batch, fake_tokens(batch, gen)
        if step:
            for phase, t in zip(AHEAD_PHASES, (t_schedule, t_prepare, t_post)):
                times[phase].append(t)
    return times


def summarize(times: dict[str, list[float]],
              host_phases: tuple[str, ...] = HOST_PHASES) -> list[dict[str, float | str]]:
    rows = [{"phase": phase, "median_us": statistics.median(ts) * 1e6, "mean_us": statistics.fmean(ts) * 1e6,
             "steps": len(ts)} for phase, ts in times.items() if ts]
    host = [p for p in host_phases if times[p]]
    per_step = [sum(times[p][i] for p in host) for i in range(len(times[host[0]]))]
    rows.append({"phase": "host total (" + ", ".join(host) + ")", "median_us": statistics.median(per_step) * 1e6,
                 "mean_us": statistics.fmean(per_step) * 1e6, "steps": len(per_step)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256, help="running sequences (default 256)")
    parser.add_argument("--steps", type=int, default=90, help="timed decode steps (<= 99: no sequence finishes)")
    parser.add_argument("--sample-steps", type=int, default=3, help="steps that also sample at the full vocabulary")
    parser.add_argument("--num-blocks", type=int, default=40960, help="KV blocks of 16 tokens (no preemption)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: host-only numbers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if not 1 <= args.steps <= 99:
        raise ValueError(f"--steps must be in [1, 99] so that no sequence finishes, got {args.steps}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    sched = build_scheduler(args.seqs, args.num_blocks, args.seed)
    prefill_steps = prefill(sched, gen)
    rows = summarize(decode_steps(sched, args.steps, min(args.sample_steps, args.steps), gen))
    sched = build_scheduler(args.seqs, args.num_blocks, args.seed)
    prefill(sched, gen)
    ahead_rows = summarize(ahead_steps(sched, args.steps, gen), AHEAD_PHASES)
    print(f"{args.seqs} sequences, {prefill_steps} prefill steps, {args.steps} timed decode steps, "
          f"{torch.get_num_threads()} CPU threads")
    print_table(rows)
    print("\nasync scheduling (all of it overlaps the device's step on CUDA; sampling as above):")
    print_table(ahead_rows)
    if args.out is not None:
        result = {"seqs": args.seqs, "steps": args.steps, "rows": rows, "ahead_rows": ahead_rows}
        args.out.write_text(json.dumps(result, indent=1))


def print_table(rows: list[dict[str, float | str]]) -> None:
    width = max(len(row["phase"]) for row in rows)
    print(f"| {'phase':<{width}} | {'median us':>10} | {'mean us':>10} | {'steps':>5} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 12}|{'-' * 7}|")
    for row in rows:
        print(f"| {row['phase']:<{width}} | {row['median_us']:>10.1f} | {row['mean_us']:>10.1f} | {row['steps']:>5} |")


if __name__ == "__main__":
    main()
