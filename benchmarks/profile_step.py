"""Profile decode steps of the Qwen3-shaped model in one compile mode (torch.profiler tables).

    python -m infer.benchmarks.profile_step --mode piecewise-eager --batch 1 [--steps 5]
    python -m infer.benchmarks.profile_step --mode full-inductor --batch 16 --prefill 1024   # a prefill step

Under PDL (the default on Hopper) a kernel starts while the one before it drains, and the profiler
counts that wait in its duration: at 0.6B batch 64 the skinny GEMM showed 12.8 us a launch and the
profiled step 3.8 ms for a 2.05 ms step (H200). For per-kernel times run with ``INFER_PDL=0``
(kernels then run one after another, as the profiler assumes); for what each kind of kernel costs
inside the overlapped step, use :mod:`infer.benchmarks.step_breakdown`.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ..runtime.attention import AttentionMetadata, forward_context
from ..runtime.kernels.pdl import pdl_enabled
from .decode_step import BLOCK, MODES, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--mode", choices=sorted(MODES), default="piecewise-eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--prefill", type=int, default=0,
                        help="profile a prefill step of this many new tokens per sequence (the context is its length)")
    args = parser.parse_args()
    new = max(1, args.prefill)  # query tokens per sequence
    context = args.prefill if args.prefill else args.context + 1  # sequence length, this step included
    blocks_per_seq = (context + BLOCK - 1) // BLOCK + 1
    model, _ = build(args.shape, args.batch * blocks_per_seq)
    tables = [[b * blocks_per_seq + j for j in range(blocks_per_seq)] for b in range(args.batch)]
    md = AttentionMetadata.build([new] * args.batch, [context] * args.batch, tables, BLOCK, "cuda")
    ids = torch.randint(0, 1000, (args.batch * new,), device="cuda")
    pos = torch.arange(context - new, context, device="cuda").repeat(args.batch)
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
    if pdl_enabled(torch.device("cuda")):
        print("note: PDL is on: kernel durations include their early start (INFER_PDL=0 for per-kernel times)")
    print(f"== {args.mode} batch {args.batch} x {new} tokens: by self CPU time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(f"== {args.mode} batch {args.batch} x {new} tokens: by device time")
    print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
