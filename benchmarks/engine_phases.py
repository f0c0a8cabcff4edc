"""Where an engine run's time goes: scheduler, input preparation, forward (prefill / decode),
LM head + sampling, postprocess; on the throughput scenario's workload.

    python -m infer.benchmarks.engine_phases [--seqs 256] [--mode inductor]

Each phase is bracketed by device synchronizations, so its time is its own host time plus the
device work it launched; the run is slower than an unsynchronized one (``throughput`` measures
that), but the split shows which phase to attack. Forwards are split by batch size; with full
decode graphs (the engine's default) a decode step replays its graph in ``launch`` and only prefill
and mixed steps pass through ``forward``, so the device-span table below covers decode.

A first, unsynchronized run is timed on the device instead: CUDA events around each step's launch
(forward, with the LM head when a decode graph replays) and its sampling give the device time of
each kind of step, and what is left of the wall time is the device waiting for the host.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch

from .decode_step import qwen3_config
from .hf_baselines import save_checkpoint
from .throughput import LLM_MODES, MAX_BATCHED_TOKENS, MAX_MODEL_LEN, WARMUP_SEQS, Workload


class Phases:
    """Accumulated seconds, counts and the longest call per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.longest: dict[str, float] = collections.defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] += seconds
        self.calls[key] += 1
        self.longest[key] = max(self.longest[key], seconds)

    def wrap(self, obj, name: str, phase) -> None:
        """Replace ``obj.name`` with a synchronized, timed call; ``phase(*args)`` names the phase."""
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            torch.cuda.synchronize()
            self.add(phase(*args), time.perf_counter() - start)
            return out
        setattr(obj, name, timed)


class DeviceSpans:
    """Device time between CUDA events recorded around calls, per phase name (no synchronization)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, obj, name: str, phase) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = inner(*args, **kwargs)
            end.record()
            self.spans.append((phase(*args), start, end))
            return out
        setattr(obj, name, timed)

    def totals(self) -> tuple[Phases, float]:
        """Seconds and calls per phase, and the seconds from the first event to the last."""
        torch.cuda.synchronize()
        totals = Phases()
        for key, start, end in self.spans:
            totals.add(key, start.elapsed_time(end) / 1e3)
        return totals, self.spans[0][1].elapsed_time(self.spans[-1][2]) / 1e3


def _launch_phase(batch, *args) -> str:
    if batch.is_prefill:
        return "launch prefill/mixed"
    return f"launch decode (<= {1 << max(0, (len(batch.entries) - 1).bit_length())} seqs)"


def _print_table(phases: Phases, total: float) -> None:
    print("| phase | calls | seconds | ms/call | longest ms | share |")
    print("|---|---|---|---|---|---|")
    for key in sorted(phases.seconds, key=phases.seconds.get, reverse=True):
        s, n = phases.seconds[key], phases.calls[key]
        print(f"| {key} | {n} | {s:.3f} | {1e3 * s / n:.3f} | {1e3 * phases.longest[key]:.3f} | {s / total:.1%} |")
    accounted = sum(phases.seconds.values())
    print(f"| (unaccounted) | | {total - accounted:.3f} | | | {(total - accounted) / total:.1%} |")


def _forward_phase(runner):
    def phase(input_ids, positions, metadata, *step) -> str:
        if metadata.is_uniform_decode:
            n = input_ids.shape[0]
            bucket = 1 << max(0, (n - 1).bit_length())
            return f"forward decode (<= {bucket} seqs)"
        return "forward prefill/mixed"
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--mode", choices=sorted(LLM_MODES), default="inductor")
    parser.add_argument("--shape", default="0.6b")
    args = parser.parse_args()
    from ..runtime.engine import model_runner as mr
    from ..runtime.engine.llm import LLM
    from ..runtime.engine.sampling import SamplingParams

    cfg = qwen3_config(args.shape)
    workload = Workload(args.seqs, (100, 1024), (100, 1024))
    prompts, outputs = workload.sample(cfg.vocab_size)
    with tempfile.TemporaryDirectory(prefix="infer-phases-") as folder:
        save_checkpoint(cfg, folder, "cuda")
        llm = LLM(folder, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=len(prompts), compile=True,
                  device="cuda", max_num_batched_tokens=MAX_BATCHED_TOKENS, **LLM_MODES[args.mode])
        warmup = SamplingParams(temperature=workload.temperature, max_tokens=4, ignore_eos=True)
        llm.generate([p[:16] for p in prompts[:WARMUP_SEQS]], warmup, use_tqdm=False)  # as throughput's warm-up
        params = [SamplingParams(temperature=workload.temperature, max_tokens=n, ignore_eos=True) for n in outputs]
        runner = llm.runner
        device = DeviceSpans()
        launch, sample_fn = runner.launch, runner._sample
        device.wrap(runner, "launch", _launch_phase)
        device.wrap(runner, "_sample", lambda *a: "sample")
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        plain = time.perf_counter() - start
        runner.launch, runner._sample = launch, sample_fn
        device_phases, device_total = device.totals()
        phases = Phases()
        phases.wrap(llm.scheduler, "schedule", lambda: "schedule")
        phases.wrap(llm.scheduler, "schedule_ahead", lambda prev: "schedule")
        phases.wrap(llm.scheduler, "postprocess", lambda *a: "postprocess")
        phases.wrap(runner, "prepare", lambda batch, *a: "prepare " + ("prefill" if batch.is_prefill else "decode"))
        phases.wrap(runner, "forward", _forward_phase(runner))
        phases.wrap(runner.model, "compute_logits", lambda hidden: "lm head")
        phases.wrap(mr, "sample", lambda logits, *a: "sample")
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        timed = time.perf_counter() - start
    tokens = sum(outputs)
    print(f"{args.seqs} sequences, {tokens} output tokens: {plain:.2f} s unsynchronized "
          f"({tokens / plain:.0f} tok/s); {timed:.2f} s with phase timers")
    print(f"\ndevice time per phase, unsynchronized run (first to last event {device_total:.2f} s; "
          f"unaccounted: the device waiting for the host):")
    _print_table(device_phases, device_total)
    print("\nhost + device time per phase, synchronized run:")
    _print_table(phases, timed)


if __name__ == "__main__":
    main()
