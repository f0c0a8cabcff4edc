"""Where compiling the model goes, phase by phase, for a Qwen3 of any depth (narrow width: runs on CPU).

    python -m infer.benchmarks.trace_profile --layers 36 [--inner eager] [--cprofile 30]
    python -m infer.benchmarks.trace_profile --layers 9 18 36 --repeat 2   # fresh process per run, per-layer slope
    python -m infer.benchmarks.trace_profile --device cuda --shape 8b [--cudagraph piecewise]

Tracing cost follows the number of ops, not their width, so the default ``narrow`` shape (hidden 64,
4/2 heads of 16, intermediate 128) shows on CPU what the 8B graph costs. The model is compiled and
called as ``ModelRunner.forward`` does it: dim 0 of ``input_ids`` and ``positions`` unbacked, inside
``forward_context`` under ``inference_mode``, on a prefill of two prompts. Phases, in seconds:

- init: the first ``torch.compile`` of the process (imports, Dynamo set-up), on a trivial function;
- dynamo: Dynamo's bytecode tracing (fake-tensor propagation of the torch-level ops);
- aot_meta / aot_trace: AOT autograd's metadata run, then its functionalized trace to ATen;
- passes / split_inner: this package's passes; the graph split and inner compile of the pieces;
- guards: Dynamo's guard building; other: the rest of the frame compile (Dynamo and backend);
- first_run: the first call beyond its compile (on CPU mostly one-time kernel set-up).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import subprocess
import sys
import time

import torch
import transformers

from .. import torch_internals as internals

MARKER = "TRACE_PROFILE "
NARROW = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
              vocab_size=1000, tie_word_embeddings=False)
BLOCK = 16
PROMPTS = (7, 5)  # token counts of the prefill batch
PHASES = ("dynamo", "aot_meta", "aot_trace", "passes", "split_inner", "guards", "other", "first_run")


def build_model(shape: str, layers: int | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight Qwen3 with a KV cache bound to every layer."""
    from ..models.qwen import Qwen3ForCausalLM
    from . import decode_step

    blocks = len(PROMPTS) * (max(PROMPTS) // BLOCK + 1)
    if shape != "narrow" and layers is None:
        return decode_step.build(shape, blocks, device)[0]
    fields = NARROW if shape == "narrow" else decode_step.SHAPES[shape]
    cfg = transformers.Qwen3Config(**dict(fields, num_hidden_layers=layers or 36), max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype=dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    from ..runtime.attention import Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.zeros(2, blocks, BLOCK, m.num_kv_heads, m.head_dim, dtype=dtype, device=device))
    return model


def prefill_batch(device: str, vocab: int):
    """``(input_ids [T], positions [T], metadata)`` of a prefill of ``PROMPTS``."""
    from ..runtime.attention import AttentionMetadata

    tables = [[i] for i in range(len(PROMPTS))]
    metadata = AttentionMetadata.build(list(PROMPTS), list(PROMPTS), tables, BLOCK, device)
    ids = torch.randint(0, vocab, (sum(PROMPTS),), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.tensor([p for n in PROMPTS for p in range(n)], device=device)
    return ids, positions, metadata


def _metrics() -> dict[str, list[float]]:
    return internals.dynamo_phase_times()


def _graph_breaks() -> int:
    return internals.graph_break_count()


def _call(forward, ids, positions, metadata, device: str):
    from torch._dynamo.decorators import mark_unbacked

    from ..runtime.attention import forward_context
    mark_unbacked(ids, 0)
    mark_unbacked(positions, 0)
    with forward_context(metadata), torch.inference_mode():
        out = forward(ids, positions)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def init_seconds(options: dict) -> float:
    """First use of ``torch.compile`` with the backend, on a function of one op."""
    start = time.perf_counter()
    f = torch.compile(lambda x: x * 2 + 1, backend="infer", options=dict(options, cudagraph_mode="none"))
    with torch.inference_mode():
        f(torch.ones(3))
    return time.perf_counter() - start


def measure(model, options: dict, device: str, profile: cProfile.Profile | None = None,
            cache_dir: str | None = None) -> dict:
    """Compile and run ``model.forward`` once; the wall time of the call split into ``PHASES``.

    With ``cache_dir``, the compile cache is looked up first: a hit times the load (``compile``)
    and the first call; a miss compiles while recording and stores the graph (``cache_store``)."""
    from ..compiler import cache

    ids, positions, metadata = prefill_batch(device, model.config.vocab_size)
    key = cache.cache_key(model, options) if cache_dir else None
    start = time.perf_counter()
    loaded = cache.lookup(cache_dir, key, model) if key else None
    if loaded is not None:
        load = time.perf_counter() - start
        with _profiling(profile):
            _call(loaded, ids, positions, metadata, device)
        wall = time.perf_counter() - start
        r = loaded.report
        return dict({k: 0.0 for k in PHASES}, wall=wall, cache="hit", compile=load, first_run=wall - load,
                    split_inner=r.time_inner_s, frames=0, graph_breaks=0, nodes_before=r.nodes_before,
                    nodes_after=r.nodes_after, pieces=r.pieces)
    forward = torch.compile(model.forward, backend="infer", options=options)
    before, breaks = _metrics(), _graph_breaks()
    start = time.perf_counter()
    with _profiling(profile), (cache.recording() if key else contextlib.nullcontext()) as rec:
        out = _call(forward, ids, positions, metadata, device)
    wall = time.perf_counter() - start
    row = _split_times(before, breaks, wall)
    row["cache"] = "off" if key is None else "miss"
    if key is not None:
        start = time.perf_counter()
        cache.store(cache_dir, key, rec, model.forward, out)
        row["cache_store"] = time.perf_counter() - start
    return row


@contextlib.contextmanager
def _profiling(profile: cProfile.Profile | None):
    if profile is not None:
        profile.enable()
    try:
        yield
    finally:
        if profile is not None:
            profile.disable()


def _split_times(before: dict, breaks: int, wall: float) -> dict:
    """The phases of one compiled call, from Dynamo's counters and the compile report."""
    from ..compiler import last_report

    m = {k: sum(v[len(before[k]):]) for k, v in _metrics().items()}
    frames = len(_metrics()["frame"]) - len(before["frame"])
    r = last_report()
    aot = getattr(r, "time_aot_s", r.time_total_s - r.time_passes_s - r.time_inner_s)  # older reports lack it
    row = dict(wall=wall, frames=frames, graph_breaks=_graph_breaks() - breaks, nodes_before=r.nodes_before,
               nodes_after=r.nodes_after, pieces=r.pieces, dynamo=m["tracing"],
               aot_meta=m["aot_metadata"], aot_trace=aot - m["aot_metadata"],
               passes=r.time_passes_s, split_inner=r.time_inner_s, guards=m["guards"])
    row["compile"] = m["frame"]
    row["other"] = row["compile"] - sum(row[k] for k in PHASES[:6])
    row["first_run"] = wall - row["compile"]
    return row


def run_one(args: argparse.Namespace, layers: int | None) -> dict:
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    options = {"inner_compiler": args.inner, "cudagraph_mode": args.cudagraph}
    init = init_seconds(options)
    model = build_model(args.shape, layers, args.device, dtype)
    profile = cProfile.Profile() if args.cprofile else None
    row = dict(shape=args.shape, layers=model.config.num_hidden_layers, inner=args.inner,
               cudagraph=args.cudagraph, device=args.device, dtype=str(dtype).removeprefix("torch."), init=init,
               **measure(model, options, args.device, profile, args.cache))
    if profile is not None:
        stats = pstats.Stats(profile, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(args.cprofile)
        stats.sort_stats("tottime").print_stats(args.cprofile)
    return row


def run_fresh(argv: list[str], layers: int) -> dict:
    """One measurement in a fresh Python process (cold caches, nothing imported)."""
    cmd = [sys.executable, "-m", "infer.benchmarks.trace_profile", "--child", "--layers", str(layers), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child for {layers} layers exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(MARKER):])


def per_layer(rows: list[dict]) -> dict[str, float]:
    """Least-squares slope of each phase (and the compile total) against the layer count."""
    xs = [r["layers"] for r in rows]
    mean_x = sum(xs) / len(xs)
    var = sum((x - mean_x) ** 2 for x in xs)
    slopes = {}
    for key in ("compile",) + PHASES:
        ys = [r[key] for r in rows]
        mean_y = sum(ys) / len(ys)
        slopes[key] = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else float("nan")
    return slopes


def table(rows: list[dict]) -> str:
    keys = ("layers", "cache", "init", "compile") + PHASES + ("frames", "graph_breaks", "nodes_before", "nodes_after",
                                                              "pieces")
    lines = [" | ".join(f"{k:>11}" for k in keys)]
    for r in rows:
        lines.append(" | ".join(f"{r[k]:>11.2f}" if isinstance(r[k], float) else f"{r[k]:>11}" for k in keys))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers (default 36; the shape's own "
                        "count for a named shape); several: one fresh process each, plus per-layer slopes")
    parser.add_argument("--shape", default="narrow", help="narrow (CPU-sized width) or a benchmarks.decode_step shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: fp32 on CPU, else bf16")
    parser.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    parser.add_argument("--cudagraph", choices=("none", "piecewise", "full"), default="none")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per depth; the fastest is kept")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the top N cProfile entries "
                        "(in-process, one depth; profiling inflates every phase)")
    parser.add_argument("--cache", metavar="DIR", help="use the compile cache in DIR: the first run stores, "
                        "later runs load (compile = the load)")
    parser.add_argument("--json", help="write the rows (and slopes) to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    depths = args.layers or [None if args.shape != "narrow" else 36]
    if args.child:
        print(MARKER + json.dumps(run_one(args, depths[0])), flush=True)
        return
    if len(depths) == 1 and args.repeat == 1:
        rows = [run_one(args, depths[0])]
    elif args.cprofile:
        raise SystemExit("--cprofile profiles one in-process run: give one --layers value and no --repeat")
    else:
        passthrough = _without_layers(argv)
        rows = [min((run_fresh(passthrough, layers) for _ in range(args.repeat)), key=lambda r: r["compile"])
                for layers in depths]
    print(table(rows))
    slopes = per_layer(rows) if len(rows) > 1 else {}
    if slopes:
        print("seconds per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in slopes.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "per_layer": slopes}, f, indent=1)


def _without_layers(argv: list[str]) -> list[str]:
    out, skipping = [], False
    for a in argv:
        if a == "--layers":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
