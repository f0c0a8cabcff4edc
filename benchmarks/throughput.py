"""Offline throughput on the nano-vllm workload, against the roofline of the schedule it implies.

Workload (nano-vllm ``bench.py``): 256 sequences, prompt lengths uniform in [100, 1024] of random
token ids in [0, 10000], output lengths uniform in [100, 1024], ``ignore_eos``, temperature 0.6,
seed 0, ``max_model_len`` 4096, Qwen3-0.6B shape with random bf16 weights saved as a checkpoint.
The engine runs with ``max_num_seqs`` = the number of sequences and nano-vllm's 16,384 batched
tokens. One short warm-up ``generate`` of 64 prompts (compile, first kernels, the batched sampling
kernel) is left out of the timed region.
Modes (``LLM_MODES``) are ``infer.LLM`` keyword arguments; on CUDA the engine adds piecewise CUDA
graphs unless ``enforce_eager``.

Roofline (an approximation): the schedule is simulated with every sequence admitted in order while
fewer than ``max_num_seqs`` run, no preemption and no KV-capacity limit. Each decode step reads
all weights once (the floor's weight bytes for the live batch) plus the KV of every live sequence
(its length, the new token included); prefill is counted as compute only: 2 x matmul weights x
prompt tokens at the measured bf16 matmul rate (attention FLOPs left out). Roofline time = decode
bytes / copy bandwidth + prefill FLOPs / matmul rate; roofline tokens/s = output tokens / that.
"""
from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .decode_step import qwen3_config
from .floor import Rates, kv_bytes, matmul_params, measure_rates, weight_bytes
from .harness import Column, Settings, Table, measure, ok_rows, open_table, release_memory, skipped
from .hf_baselines import save_checkpoint

logger = logging.getLogger(__name__)

LLM_MODES = {  # name -> infer.LLM keyword arguments (on CUDA the engine captures full decode graphs by default)
    "inductor": {"compile_options": {"inner_compiler": "inductor"}},
    "inductor-whole": {"compile_options": {"inner_compiler": "inductor"}, "staged_compile": False},
    "eager": {"compile_options": {"inner_compiler": "eager"}},
    "inductor-sync": {"compile_options": {"inner_compiler": "inductor"}, "async_scheduling": False},
    "inductor-no-graphs": {"compile_options": {"inner_compiler": "inductor"}, "enforce_eager": True},
    "inductor-full": {"compile_options": {"inner_compiler": "inductor", "cudagraph_mode": "full"}},
    "eager-full": {"compile_options": {"inner_compiler": "eager", "cudagraph_mode": "full"}},
}
DEFAULT_MODES = ("inductor", "eager")
MAX_MODEL_LEN = 4096
MAX_BATCHED_TOKENS = 16384  # nano-vllm's default
WARMUP_SEQS = 64


@dataclass(frozen=True, slots=True)
class Workload:
    num_seqs: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    temperature: float = 0.6
    seed: int = 0
    max_id: int = 10000

    def sample(self, vocab_size: int) -> tuple[list[list[int]], list[int]]:
        """``(prompts as token-id lists, output lengths)``, drawn like nano-vllm's bench."""
        rng = random.Random(self.seed)
        top = min(self.max_id, vocab_size - 1)
        prompts = [[rng.randint(0, top) for _ in range(rng.randint(*self.prompt_range))]
                   for _ in range(self.num_seqs)]
        outputs = [rng.randint(*self.output_range) for _ in range(self.num_seqs)]
        return prompts, outputs


NANO_VLLM = Workload(256, (100, 1024), (100, 1024))
QUICK = Workload(64, (100, 1024), (100, 1024))
TINY = Workload(6, (8, 40), (4, 16))


def simulate_decode(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int) -> list[tuple[int, int]]:
    """``(live batch, KV tokens read)`` per decode step of the in-order schedule without preemption."""
    waiting = deque(zip(prompt_lens, output_lens))
    running: list[list[int]] = []  # [tokens incl. the one being fed, decode steps left]
    steps = []
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            prompt, output = waiting.popleft()
            if output > 1:  # the prefill step samples the first token
                running.append([prompt + 1, output - 1])
        if not running:
            continue
        steps.append((len(running), sum(seq[0] for seq in running)))
        for seq in running:
            seq[0] += 1
            seq[1] -= 1
        running = [seq for seq in running if seq[1] > 0]
    return steps


def roofline(cfg: Any, prompts: list[list[int]], outputs: list[int], max_num_seqs: int, rates: Rates) -> dict:
    steps = simulate_decode([len(p) for p in prompts], outputs, max_num_seqs)
    kv_per_token = kv_bytes(cfg, 1, 0)
    decode_bytes = sum(weight_bytes(cfg, batch) + tokens * kv_per_token for batch, tokens in steps)
    prefill_flops = 2 * matmul_params(cfg) * sum(len(p) for p in prompts)
    seconds = decode_bytes / (rates.copy_gbps * 1e9) + prefill_flops / (rates.matmul_tflops * 1e12)
    return dict(roofline_s=seconds, roofline_tok_s=sum(outputs) / seconds, decode_steps=len(steps),
                decode_gb=decode_bytes / 1e9)


def uses_inductor(mode: str) -> bool:
    return LLM_MODES[mode]["compile_options"].get("inner_compiler", "inductor") == "inductor"


def run_llm(folder: str, llm_kwargs: dict, prompts: list[list[int]], outputs: list[int], workload: Workload,
            settings: Settings) -> dict[str, Any]:
    """Build ``infer.LLM`` on ``folder``, warm up, then time ``generate`` of the whole workload."""
    from ..runtime.engine.llm import LLM
    from ..runtime.engine.sampling import SamplingParams

    extra = {"max_num_batched_tokens": MAX_BATCHED_TOKENS} if settings.cuda else {}
    llm = None
    try:
        start = time.perf_counter()
        llm = LLM(folder, dtype="bfloat16", max_model_len=MAX_MODEL_LEN if settings.cuda else 256,
                  max_num_seqs=len(prompts), compile=True, device=settings.device, **extra, **llm_kwargs)
        init_s = time.perf_counter() - start
        capture_s = getattr(llm, "capture_seconds", None)
        # Warm-up outside the timed region: short prompts, enough of them (and the workload's
        # temperature) that the large-batch sampling kernel is compiled here too.
        llm.generate([p[:16] for p in prompts[:WARMUP_SEQS]],
                     SamplingParams(temperature=workload.temperature, max_tokens=4, ignore_eos=True), use_tqdm=False)
        params = [SamplingParams(temperature=workload.temperature, max_tokens=n, ignore_eos=True) for n in outputs]
        _sync(settings)
        start = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        _sync(settings)
        seconds = time.perf_counter() - start
    finally:
        del llm
        torch._dynamo.reset()
        release_memory()
    tokens = sum(len(r.token_ids) for r in results)
    errors = [r.error for r in results if r.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} requests failed, first: {errors[0]}")
    return dict(output_tokens=tokens, seconds=seconds, tok_s=tokens / seconds, init_s=init_s, capture_s=capture_s)


def _sync(settings: Settings) -> None:
    if settings.cuda:
        torch.cuda.synchronize()


COLUMNS = [Column("shape", "shape"), Column("mode", "mode"), Column("num_seqs", "sequences"),
           Column("output_tokens", "output tokens"), Column("seconds", "seconds", ".2f"),
           Column("tok_s", "tokens/s", ".0f"), Column("roofline_tok_s", "roofline tokens/s", ".0f"),
           Column("of_roofline", "of roofline", ".1%"), Column("decode_steps", "decode steps (sim)"),
           Column("init_s", "LLM() s", ".1f"), Column("capture_s", "graph capture s", ".1f")]


def run(settings: Settings, rates: Rates | None = None, llm_modes: tuple[str, ...] = DEFAULT_MODES) -> Table:
    table = open_table(settings, "throughput", "Offline throughput, nano-vllm workload (random-weight Qwen3, bf16)",
                       COLUMNS, ("shape", "mode", "num_seqs"))
    rates = rates or measure_rates(settings.device)
    workload = TINY if settings.tiny else QUICK if settings.quick else NANO_VLLM
    shape = settings.shapes[0]
    cfg = qwen3_config(shape)
    prompts, outputs = workload.sample(cfg.vocab_size)
    sim = roofline(cfg, prompts, outputs, len(prompts), rates)
    table.meta.update(copy_gbps=rates.copy_gbps, matmul_tflops=rates.matmul_tflops, workload=str(workload),
                      prompt_tokens=sum(len(p) for p in prompts), requested_output_tokens=sum(outputs),
                      roofline_s=sim["roofline_s"], max_num_seqs=len(prompts))
    table.note("roofline: simulated in-order schedule, decode = weights + live KV per step / copy bandwidth, "
               "prefill = matmul FLOPs / matmul rate (see benchmarks/throughput.py)")
    with tempfile.TemporaryDirectory(prefix="infer-bench-ckpt-", dir=settings.tmp_dir) as folder:
        save_checkpoint(cfg, folder, settings.device)
        release_memory()
        for mode in llm_modes:
            base = dict(shape=shape, mode=mode, num_seqs=len(prompts), roofline_tok_s=sim["roofline_tok_s"],
                        decode_steps=sim["decode_steps"])
            if not settings.cuda and uses_inductor(mode):
                skipped(table, base, "Inductor modes need CUDA here (CPU run: slow C++ compile)")
                continue

            def timed(mode=mode) -> dict[str, Any]:
                got = run_llm(folder, LLM_MODES[mode], prompts, outputs, workload, settings)
                return dict(got, of_roofline=got["tok_s"] / sim["roofline_tok_s"])
            measure(table, base, timed)
    return table


def plot(fig, table: Table) -> None:
    ax = fig.subplots()
    rows = ok_rows(table)
    names = [r["mode"] for r in rows] + ["roofline"]
    values = [r["tok_s"] for r in rows] + [table.rows[0]["roofline_tok_s"] if table.rows else 0.0]
    ax.bar(names, values, color=["C0"] * len(rows) + ["grey"])
    ax.set_ylabel("output tokens / s")
