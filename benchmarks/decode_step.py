"""Decode step of a Qwen3-shaped model (random bf16 weights): eager vs compiled modes, vs the floor.

    python -m infer.benchmarks.decode_step [--shape 0.6b|8b] [--batch 1 64] [--context 512]
        [--modes eager piecewise-eager piecewise-inductor full-eager nopass-piecewise-eager] [--out FILE]

A step is one token for each of `batch` sequences that already hold `context` tokens. Floor =
(weight bytes read per step + KV bytes read) / copy bandwidth (2 GiB bf16 copy, read + written).
The embedding counts only for gathered rows; a tied LM head counts in full, and the timed step
includes it (before 2026-11-22 this script timed the forward alone against that floor, which made
its ratios ~0.1 ms per step too good at 0.6B; the harness's ``decode`` scenario always included it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..compiler.cudagraph import CudaGraphPool, CudaGraphWrapper
from ..compiler.stages import compile_stages
from ..models.qwen import Qwen3ForCausalLM
from ..runtime.attention import Attention, AttentionMetadata, forward_context
from . import floor
from .harness import write_rows
from .shapes import SHAPES, qwen3_config  # noqa: F401 (the benchmarks' shapes, named here too)

BLOCK = 16
MODES = {  # name -> compile options (None = eager PyTorch, no compile); full-*: stage by stage, as the
    # engine compiles, unless "staged": False (one whole-forward graph)
    "eager": None,
    "piecewise-eager": {"inner_compiler": "eager", "cudagraph_mode": "piecewise"},
    "piecewise-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "piecewise"},
    "full-eager": {"inner_compiler": "eager", "cudagraph_mode": "full"},
    "full-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "full"},
    "whole-full-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "full", "staged": False},
    "nolinear-full-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "full", "fuse_linear": False},
    "nopass-piecewise-eager": {"inner_compiler": "eager", "cudagraph_mode": "piecewise", "fuse_norm": False,
                               "fuse_gemm": False, "fuse_activation": False, "fuse_linear": False},
    "nopass-full-eager": {"inner_compiler": "eager", "cudagraph_mode": "full", "fuse_norm": False,
                          "fuse_gemm": False, "fuse_activation": False, "fuse_linear": False},
    "nopass-full-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "full", "fuse_norm": False,
                             "fuse_gemm": False, "fuse_activation": False, "fuse_linear": False},
    "nopass-piecewise-inductor": {"inner_compiler": "inductor", "cudagraph_mode": "piecewise",
                                  "fuse_norm": False, "fuse_gemm": False, "fuse_activation": False, "fuse_linear": False},
}


def copy_bandwidth() -> float:
    """GB/s of the standard 2 GiB bf16 device copy (:func:`infer.benchmarks.floor.copy_bandwidth`)."""
    return floor.copy_bandwidth("cuda")


def bind_kv(model, num_blocks: int, device: str = "cuda") -> None:
    """Give every attention layer its own random ``[2, num_blocks, BLOCK, Hkv, D]`` bf16 cache."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.randn(2, num_blocks, BLOCK, m.num_kv_heads, m.head_dim,
                                        device=device, dtype=torch.bfloat16))


def build(shape: str, num_blocks: int, device: str = "cuda"):
    """Random-weight bf16 model of ``shape``; ``num_blocks`` KV blocks per layer (0: bind later)."""
    cfg = qwen3_config(shape)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    if num_blocks > 0:
        bind_kv(model, num_blocks, device)
    return model, cfg


def floor_bytes(model, cfg, batch: int, context: int) -> int:
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    weights += batch * embed.shape[1] * embed.element_size()
    if cfg.tie_word_embeddings:
        weights += embed.numel() * embed.element_size()
    kv = 2 * cfg.num_hidden_layers * batch * (context + 1) * cfg.num_key_value_heads * cfg.head_dim * 2
    return weights + kv


def _elapsed_ms(fn, device: str) -> float:
    """Milliseconds of one ``fn()``: CUDA events on CUDA, a host clock elsewhere."""
    if device.startswith("cuda"):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        return s.elapsed_time(e)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_mode(model, options, batch: int, context: int, steps: int = 50, device: str = "cuda",
              logits: bool = False) -> tuple[float, float]:
    """``(median ms per step, seconds of the first 3 calls)``; ``logits`` adds the eager LM head."""
    blocks_per_seq = (context + 1 + BLOCK - 1) // BLOCK
    tables = [[b * blocks_per_seq + j for j in range(blocks_per_seq)] for b in range(batch)]
    md = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables, BLOCK, device)
    ids = torch.randint(0, min(1000, model.config.vocab_size), (batch,), device=device)
    pos = torch.full((batch,), context, device=device)
    torch._dynamo.reset()
    # Full graphs are captured the way the engine's ModelRunner does it: around the compiled
    # forward (compiled without graphs) and the LM head, replayed directly.
    runner_graph = options is not None and options.get("cudagraph_mode") == "full" and device.startswith("cuda")
    staged = False
    if options is not None:
        options = dict(options)
        staged = options.pop("staged", True) and runner_graph and hasattr(model, "run_stages")
    if runner_graph:
        options = dict(options, cudagraph_mode="none")
    if staged:
        stages = compile_stages(model.stages, options)
        forward = lambda ids, pos: model.run_stages(ids, pos, stages)  # noqa: E731
    else:
        forward = model.forward if options is None else torch.compile(
            model.forward, backend="infer", options=dict(options, cudagraph_capture_sizes=(batch,)))
    step = (lambda: model.compute_logits(forward(ids, pos))) if logits else (lambda: forward(ids, pos))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    with forward_context(md), torch.inference_mode():
        for _ in range(3):
            if not staged:  # stages mark dim 0 unbacked themselves, as in the engine
                torch._dynamo.mark_dynamic(ids, 0); torch._dynamo.mark_dynamic(pos, 0)
            step()
        sync()
        if runner_graph:
            graph = CudaGraphWrapper(step, "full", CudaGraphPool(), boxed=False)
            graph.capture(batch, [])
            step = lambda: graph.replay(batch, [])  # noqa: E731
            step()
            sync()
        startup = time.perf_counter() - start
        times = [_elapsed_ms(step, device) for _ in range(steps)]
    return statistics.median(times), startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--out")
    args = parser.parse_args()
    bw = copy_bandwidth()
    blocks = max(args.batch) * ((args.context + BLOCK) // BLOCK + 1)
    model, cfg = build(args.shape, blocks)
    rows = []
    for batch in args.batch:
        floor_ms = floor_bytes(model, cfg, batch, args.context) / (bw * 1e9) * 1e3
        for mode in args.modes:
            ms, startup = time_mode(model, MODES[mode], batch, args.context, logits=True)
            rows.append(dict(shape=args.shape, mode=mode, batch=batch, context=args.context, ms=ms,
                             floor_ms=floor_ms, ratio=ms / floor_ms, startup_s=startup))
            print(f"{mode} batch {batch}: {ms:.3f} ms/step ({ms / floor_ms:.2f}x floor), "
                  f"first calls {startup:.1f}s", flush=True)
    lines = [f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s", "",
             "| shape | mode | batch | context | ms/step | floor ms | x floor | first 3 calls s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['mode']} | {r['batch']} | {r['context']} | {r['ms']:.3f} | "
              f"{r['floor_ms']:.3f} | {r['ratio']:.2f} | {r['startup_s']:.1f} |" for r in rows]
    write_rows(args.out, rows, copy_gbps=bw)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
