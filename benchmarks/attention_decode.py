"""Decode-attention bandwidth: achieved KV GB/s of the Triton split-K kernel vs a device copy.

    python -m infer.benchmarks.attention_decode [--out decode.json] [--block-n 64 128 --num-warps 4 8 ...]
    python -m infer.benchmarks.attention_decode --paths write+decode fused --batch 1 8 64 256 \
        --context 512 2048 --block-size 16   # fused KV write vs the two-kernel step

Scenario: 16 q / 8 kv heads, head_dim 128, bf16, context 2048, batch 64 and 256, pages of 16
(and 64) tokens scattered randomly over the pool. Every configuration is checked against the
plain-torch reference first, then timed per launch: several launches per CUDA-graph replay, on
copies of the batch that L2 cannot hold together (median over replays; several launches per replay
keep the host's graph launch out of the number). KV
bandwidth = K and V bytes read / time. Copy bandwidth = (read + written bytes) of a 2 GiB bf16
device-to-device copy into a preallocated buffer, median of 20. Targets are FlashInfer's H100
numbers (2,447 GB/s at batch 64, 2,868 GB/s at batch 256). Paths: ``decode`` (attention only, the
cache already written), ``write+decode`` (``write_kv_cache`` then ``decode_attention``, one layer's
decode step without the fused write) and ``fused`` (``decode_attention_with_kv_write``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging

import torch

logger = logging.getLogger(__name__)

TARGET_GBPS = {64: 2447.0, 256: 2868.0}
STREAM_BYTES = 256 << 20  # K/V bytes the copies of a case hold together (L2 is 50-60 MB)
MAX_COPIES = 64
MIN_LAUNCHES = 8  # per graph replay: the host's graph launch is spread over these
PATHS = ("decode", "write+decode", "fused")
CHECK_SEQS = 8


def copy_bandwidth_gbps() -> float:
    """GB/s of the standard 2 GiB bf16 device copy (:func:`infer.benchmarks.floor.copy_bandwidth`)."""
    from .floor import copy_bandwidth
    return copy_bandwidth("cuda")


def make_decode_batch(batch: int, context: int, block_size: int, hq: int, hkv: int, d: int, seed: int = 0):
    """Random q, a pool holding exactly the batch's pages (shuffled), and its block tables."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)  # [B, W]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")  # [B]
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # [B, Hq, D]
    return q, cache, seq_lens, block_tables


def check_against_reference(out, q, cache, seq_lens, block_tables, scale) -> float:
    from ..runtime.attention.metadata import AttentionMetadata
    from ..runtime.attention.reference import attend_reference

    n = min(CHECK_SEQS, q.shape[0])
    md = AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device="cuda"),
        seq_lens=seq_lens[:n], block_tables=block_tables[:n],
        max_query_len=1, max_seq_len=int(seq_lens.max()), num_seqs=n, num_tokens=n,
    )
    ref = attend_reference(q[:n], cache, scale, md)
    err = (out[:n].float() - ref.float()).abs().max().item()
    if err > 2e-2:
        raise RuntimeError(f"decode kernel disagrees with the reference: max abs error {err:.3g}")
    return err


def make_step(path, q, cache, seq_lens, block_tables, scale, out, config, num_splits):
    """A closure running one decode step of ``path`` (see ``PATHS``); new k/v go to position context-1."""
    from ..runtime.kernels import attention_triton as kernels

    if path not in PATHS:
        raise ValueError(f"path {path!r} is not one of {PATHS}")
    num_seqs, block_size = q.shape[0], cache.shape[2]
    pos = seq_lens.long() - 1  # [B]
    slots = block_tables.gather(1, (pos // block_size)[:, None])[:, 0].long() * block_size + pos % block_size
    k = torch.randn(num_seqs, cache.shape[3], cache.shape[4], device=q.device, dtype=q.dtype)  # [B, Hkv, D]
    v = torch.randn_like(k)  # [B, Hkv, D]
    attend = dict(out=out, config=config, num_splits=num_splits)
    if path == "fused":
        return lambda: kernels.decode_attention_with_kv_write(q, k, v, cache, slots, seq_lens, block_tables, scale,
                                                              **attend)

    def step():
        if path == "write+decode":
            kernels.write_kv_cache(k, v, cache, slots)
        kernels.decode_attention(q, cache, seq_lens, block_tables, scale, **attend)
    return step


def run_case(batch, context, block_size, config, num_splits, hq=16, hkv=8, d=128, iters=50, path="decode") -> dict:
    """One configuration, checked against the reference, then timed per launch: launches back to
    back in one CUDA graph (at least ``MIN_LAUNCHES``), cycling over copies of the batch that
    together pass ``STREAM_BYTES``, so each launch streams its K/V from memory, not from L2."""
    from ..runtime.kernels.decode_plan import choose_num_splits
    from .harness import graph_ms_per_call

    kv_bytes = 2 * batch * context * hkv * d * 2  # K and V, bf16 (make_decode_batch)
    copies = min(MAX_COPIES, max(1, -(-STREAM_BYTES // kv_bytes)))
    steps = []
    for i in range(copies):
        q, cache, seq_lens, block_tables = make_decode_batch(batch, context, block_size, hq, hkv, d, seed=i)
        out = torch.empty_like(q)
        steps.append(make_step(path, q, cache, seq_lens, block_tables, d**-0.5, out, config, num_splits))
        if i == 0:
            steps[0]()
            err = check_against_reference(out, q, cache, seq_lens, block_tables, d**-0.5)
    launches = max(MIN_LAUNCHES, copies)
    ms = graph_ms_per_call(lambda i: steps[i % copies](), launches, replays=iters)
    splits = num_splits or choose_num_splits(batch, hkv, block_tables.shape[1] * block_size, q.device, config)
    return {
        "path": path, "batch": batch, "context": context, "block_size": block_size, "num_splits": splits,
        "block_n": config.block_n, "num_warps": config.num_warps, "num_stages": config.num_stages or "auto",
        "programs_per_sm": config.programs_per_sm, "time_us": ms * 1e3,
        "kv_gbps": kv_bytes / (ms * 1e-3) / 1e9, "max_abs_err": err, "launches_per_graph": launches,
    }


def markdown_table(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        f"copy bandwidth (2 GiB bf16 D2D, read+write, median of 20): {copy_gbps:,.0f} GB/s",
        "",
        "| path | page | batch | ctx | splits | BLOCK_N | warps | stages | us | KV GB/s | % copy | target GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = TARGET_GBPS.get(r["batch"])
        lines.append(
            f"| {r['path']} | {r['block_size']} | {r['batch']} | {r['context']} | {r['num_splits']} | {r['block_n']} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['time_us']:.1f} | {r['kv_gbps']:,.0f} | "
            f"{100 * r['kv_gbps'] / copy_gbps:.0f}% | {f'{target:,.0f}' if target else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ..runtime.kernels.decode_plan import DecodeConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--context", type=int, nargs="+", default=[2048])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["decode"])
    parser.add_argument("--block-size", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--block-n", type=int, nargs="+", default=[DecodeConfig().block_n])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[DecodeConfig().num_warps])
    parser.add_argument("--num-stages", type=int, nargs="+", default=[DecodeConfig().num_stages])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[DecodeConfig().programs_per_sm])
    parser.add_argument("--num-splits", type=int, nargs="+", default=[0], help="0 = heuristic")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise RuntimeError("attention_decode benchmarks the CUDA kernel; no CUDA device is available")

    copy_gbps = copy_bandwidth_gbps()
    logger.info("copy bandwidth %.0f GB/s", copy_gbps)
    rows = []
    grid = itertools.product(args.block_size, args.batch, args.context, args.block_n, args.num_warps,
                             args.num_stages, args.programs_per_sm, args.num_splits, args.paths)
    for block_size, batch, context, block_n, warps, stages, per_sm, splits, path in grid:
        config = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
        row = run_case(batch, context, block_size, config, splits or None, iters=args.iters, path=path)
        logger.info("%s", row)
        rows.append(row)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    print(markdown_table(rows, copy_gbps))


if __name__ == "__main__":
    main()
