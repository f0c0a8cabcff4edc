"""Achieved memory bandwidth of the fused Triton kernels, against a device-to-device copy.

Usage::

    python -m infer.benchmarks.fused_kernels [--out results.json] [--no-cudagraph]

For each op (``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul`` on a packed gate_up
buffer, ``qk_norm_rotary`` with q ``[rows, hidden/128, 128]`` and a quarter as many k heads) and
each shape, the op's output is first checked against the plain-torch reference,
then timed (median). Bandwidth is (bytes read + bytes written) / time; the copy baseline
moves one large bf16 buffer into a preallocated one. Prints a markdown table; ``--out``
also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..runtime.ops.activation import silu_and_mul_ref
from ..runtime.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from ..runtime.ops.rotary import rotary_ref

logger = logging.getLogger(__name__)

SHAPES = ((4096, 4096), (1, 4096))  # [rows, hidden]
EPS = 1e-6
HEAD_DIM = 128  # qk_norm_rotary: Qwen3's head_dim, 4 q heads per k head
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True)
class Result:
    """One timed case; ``ratio_to_copy`` is the kernel's bandwidth over the copy's."""

    op: str
    shape: tuple[int, int]
    dtype: str
    bytes_moved: int
    time_us: float
    gb_per_s: float
    ratio_to_copy: float


def _median_ms(fn: Callable[[], object], use_cudagraph: bool) -> float:
    import triton.testing
    fn()  # warm-up: compiles the Triton kernel outside the timed region
    torch.cuda.synchronize()
    if use_cudagraph:  # removes Python launch overhead, which dominates tiny shapes
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(dtype: torch.dtype, mib: int, use_cudagraph: bool) -> float:
    """GB/s of a 2 GiB bf16 device-to-device copy (read + write counted, median of 20 events): the
    same baseline as every other benchmark here (`mib`, `use_cudagraph` kept for the CLI)."""
    from .decode_step import copy_bandwidth as standard_copy_bandwidth
    return standard_copy_bandwidth()


def _cases(rows: int, hidden: int, dtype: torch.dtype):
    """Yield ``(name, run, reference, bytes_moved)`` for every op at ``[rows, hidden]``.

    One run covers several independent input sets (at least ~512 MiB in all) so that repeated
    runs read HBM, not the L2 cache that a single 4096 x 4096 set would fit in."""
    size = dtype.itemsize
    copies = max(1, -(-(512 << 20) // (3 * rows * hidden * size)))
    sets = [_inputs(rows, hidden, dtype) for _ in range(copies)]
    x, res, w, gate, up = sets[0]
    rms = lambda x, w: (w, EPS, True, dtype)  # noqa: E731
    yield ("rms_norm", lambda: [torch.ops.infer.rms_norm(s[0], *rms(s[0], s[2])) for s in sets][0],
           lambda: rms_norm_ref(x, *rms(x, w)), copies * (2 * rows * hidden + hidden) * size)
    yield ("fused_add_rms_norm",
           lambda: [torch.ops.infer.fused_add_rms_norm(s[0], s[1], *rms(s[0], s[2])) for s in sets][0],
           lambda: fused_add_rms_norm_ref(x, res, *rms(x, w)), copies * (4 * rows * hidden + hidden) * size)
    yield ("silu_and_mul", lambda: [torch.ops.infer.silu_and_mul(s[3], s[4]) for s in sets][0],
           lambda: silu_and_mul_ref(gate, up), copies * 3 * rows * hidden * size)
    qk_sets = [_qk_inputs(rows, hidden, dtype) for _ in range(copies)]
    q, q_norm, k, k_norm, cos, sin = qk_sets[0]
    qk_elems = q.numel() + k.numel()
    qk_norm_rotary = lambda s: torch.ops.infer.qk_norm_rotary(s[0], *s[1], s[2], *s[3], *s[4:])  # noqa: E731
    yield ("qk_norm_rotary", lambda: [qk_norm_rotary(s) for s in qk_sets][0],
           lambda: tuple(rotary_ref(rms_norm_ref(x, *n), cos, sin) for x, n in ((q, q_norm), (k, k_norm))),
           copies * ((2 * qk_elems + 2 * HEAD_DIM) * size + 2 * cos.numel() * cos.element_size()))


def _inputs(rows: int, hidden: int, dtype: torch.dtype):
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)  # [T, H]
    res = torch.randn_like(x)  # [T, H]
    w = torch.randn(hidden, device="cuda", dtype=dtype)  # [H]
    gate_up = torch.randn(rows, 2 * hidden, device="cuda", dtype=dtype)  # [T, 2I], I = H
    return x, res, w, gate_up[:, :hidden], gate_up[:, hidden:]  # gate/up: [T, I] views, row stride 2I


def _qk_inputs(rows: int, hidden: int, dtype: torch.dtype):
    """``(q, q_norm_args, k, k_norm_args, cos, sin)``; q holds ``hidden`` elements per token."""
    q_heads = max(1, hidden // HEAD_DIM)
    q = torch.randn(rows, q_heads, HEAD_DIM, device="cuda", dtype=dtype)  # [T, Hq, D]
    k = torch.randn(rows, max(1, q_heads // 4), HEAD_DIM, device="cuda", dtype=dtype)  # [T, Hk, D]
    cos, sin = torch.randn(rows, HEAD_DIM, device="cuda").chunk(2, dim=-1)  # [T, D/2] each, fp32
    norm = lambda: (torch.randn(HEAD_DIM, device="cuda", dtype=dtype), EPS, True, dtype)  # noqa: E731
    return q, norm(), k, norm(), cos, sin


def _check(name: str, got, want) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, r in zip(got, want, strict=True):
        try:
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
        except AssertionError as err:
            raise RuntimeError(f"{name}: Triton output differs from the reference") from err


@torch.inference_mode()
def run(dtype_name: str = "bf16", copy_mib: int = 1024, use_cudagraph: bool = True
        ) -> tuple[float, list[Result]]:
    """Measure the copy baseline and every (op, shape); returns ``(copy_gbps, results)``."""
    if not torch.cuda.is_available():
        raise RuntimeError("fused_kernels benchmark needs a CUDA device")
    from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
    dtype = _DTYPES[dtype_name]
    copy_gbps = copy_bandwidth(dtype, copy_mib, use_cudagraph)
    logger.info("copy bandwidth %.1f GB/s (%d MiB %s)", copy_gbps, copy_mib, dtype_name)
    results = []
    for rows, hidden in SHAPES:
        for name, fn, ref, nbytes in _cases(rows, hidden, dtype):
            _check(name, fn(), ref())
            ms = _median_ms(fn, use_cudagraph)
            gbps = nbytes / (ms * 1e-3) / 1e9
            copies = max(1, -(-(512 << 20) // (3 * rows * hidden * _DTYPES[dtype_name].itemsize)))
            ms /= copies  # per op call
            gbps = nbytes / copies / (ms * 1e-3) / 1e9
            results.append(Result(name, (rows, hidden), dtype_name, nbytes // copies, ms * 1e3, gbps,
                                  gbps / copy_gbps))
            logger.info("%s [%d x %d]: %.2f us, %.1f GB/s", name, rows, hidden, ms * 1e3, gbps)
    return copy_gbps, results


def markdown_table(copy_gbps: float, results: list[Result]) -> str:
    lines = [f"copy bandwidth: {copy_gbps:.1f} GB/s", "",
             "| op | shape | dtype | time (us) | GB/s | of copy |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.op} | {r.shape[0]} x {r.shape[1]} | {r.dtype} | {r.time_us:.2f} "
                     f"| {r.gb_per_s:.1f} | {100 * r.ratio_to_copy:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write results as JSON to this path")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--copy-mib", type=int, default=1024, help="copy baseline size")
    parser.add_argument("--no-cudagraph", action="store_true",
                        help="time eager launches (includes Python/launch overhead)")
    args = parser.parse_args(argv)
    if args.copy_mib < 1:
        parser.error(f"--copy-mib must be >= 1, got {args.copy_mib}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    copy_gbps, results = run(args.dtype, args.copy_mib, not args.no_cudagraph)
    print(markdown_table(copy_gbps, results))  # the script's product, not a log line
    if args.out:
        payload = {"copy_gb_per_s": copy_gbps, "cudagraph": not args.no_cudagraph,
                   "results": [asdict(r) for r in results]}
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
