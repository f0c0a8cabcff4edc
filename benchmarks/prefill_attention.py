"""Prefill attention: the Triton varlen kernel's time per layer over a grid of tile configs.

    python -m infer.benchmarks.prefill_attention [--seqs 16] [--len 1024] [--out sweep.json]

Qwen3-0.6B heads (16 q / 8 kv, head_dim 128, bf16), pages of 16 scattered over the pool, every
sequence a fresh prompt of ``--len`` tokens. Each config is checked against the default config's
output, captured in a CUDA graph and timed over replays; TFLOP/s counts the causal half of QK^T
and PV.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from ..runtime.attention.metadata import AttentionMetadata
from ..runtime.kernels.prefill_attention_triton import PrefillConfig, prefill_attention
from .harness import median_ms

GRID = [PrefillConfig(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
        if not (m == 128 and w == 4 and n == 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--len", type=int, default=1024)
    parser.add_argument("--out")
    args = parser.parse_args()
    hq, hkv, d, bs = 16, 8, 128, 16
    per_seq = -(-args.len // bs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = args.seqs * per_seq
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(args.seqs, per_seq).tolist()
    md = AttentionMetadata.build([args.len] * args.seqs, [args.len] * args.seqs, tables, bs, "cuda")
    cache = torch.randn(2, num_blocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(args.seqs * args.len, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops = 4 * args.seqs * hq * d * args.len * (args.len + 1) / 2

    def run(cfg):
        return prefill_attention(q, cache, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len,
                                 d**-0.5, config=cfg)

    ref = run(PrefillConfig()).float()
    rows = []
    for cfg in GRID:
        try:
            err = (run(cfg).float() - ref).abs().max().item()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run(cfg)
            ms = median_ms(graph.replay, "cuda", 20)
        except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
            print(f"{cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
            continue
        rows.append(dict(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, us=1e3 * ms, tflops=flops / (ms * 1e-3) / 1e12, err=err))
        print(f"| {cfg.block_m} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} | {1e3 * ms:.0f} | "
              f"{rows[-1]['tflops']:.0f} | {err:.2g} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(seqs=args.seqs, len=args.len, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
