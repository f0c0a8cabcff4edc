"""Profile decode steps of the Qwen3-shaped model in one compile mode (torch.profiler tables).

    python -m infer.benchmarks.profile_step --mode piecewise-eager --batch 1 [--steps 5]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ..runtime.attention import AttentionMetadata, forward_context
from .decode_step import BLOCK, MODES, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--mode", choices=sorted(MODES), default="piecewise-eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    blocks_per_seq = (args.context + BLOCK) // BLOCK + 1
    model, _ = build(args.shape, args.batch * blocks_per_seq)
    tables = [[b * blocks_per_seq + j for j in range(blocks_per_seq)] for b in range(args.batch)]
    md = AttentionMetadata.build([1] * args.batch, [args.context + 1] * args.batch, tables, BLOCK, "cuda")
    ids = torch.randint(0, 1000, (args.batch,), device="cuda")
    pos = torch.full((args.batch,), args.context, device="cuda")
    options = MODES[args.mode]
    forward = model.forward if options is None else torch.compile(
        model.forward, backend="infer", options=dict(options, cudagraph_capture_sizes=(args.batch,)))
    with forward_context(md), torch.inference_mode():
        for _ in range(3):
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(pos, 0)
            forward(ids, pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                forward(ids, pos)
            torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"== {args.mode} batch {args.batch}: by self CPU time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(f"== {args.mode} batch {args.batch}: by device time")
    print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
