"""The decode floor: what a step must move, the device's copy bandwidth and matmul rate, GEMMs alone.

Floor of one decode step = (weight bytes the step reads + KV bytes it reads) / copy bandwidth.
The embedding counts only for the rows gathered (``batch`` rows); a tied LM head reads the whole
embedding matrix; KV reads ``context + 1`` tokens per sequence (the new token included). Copy
bandwidth = (bytes read + written) of a 2 GiB bf16 device-to-device copy into a preallocated
buffer, median of 20 (CUDA events). "GEMMs only" = the step's weight matmuls alone (per layer qkv,
o, gate_up, down, then the LM head; ``torch.mm(x, w.t())`` with ``w`` stored ``[N, K]`` as
``nn.Linear`` keeps it) captured in one CUDA graph, median replay time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .shapes import qwen3_config
from .harness import Column, Settings, Table, measure, median_ms, ok_rows, open_table, release_memory, status_of

logger = logging.getLogger(__name__)

BF16 = 2  # bytes per element of weights and KV
COPY_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}
MATMUL_N = {"cuda": 8192, "cpu": 512}
ITERS = 20


@dataclass(frozen=True, slots=True)
class Rates:
    """Measured device rates: copy bandwidth (GB/s, read + written) and bf16 matmul TFLOP/s."""

    copy_gbps: float
    matmul_tflops: float


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


@torch.inference_mode()
def copy_bandwidth(device: str, nbytes: int | None = None, iters: int = ITERS) -> float:
    numel = (nbytes or COPY_BYTES[_kind(device)]) // BF16
    src = torch.empty(numel, device=device, dtype=torch.bfloat16).normal_()  # [N]
    dst = torch.empty_like(src)  # [N]
    ms = median_ms(lambda: dst.copy_(src), device, iters)
    return 2 * numel * BF16 / (ms * 1e-3) / 1e9


@torch.inference_mode()
def matmul_tflops(device: str, n: int | None = None, iters: int = ITERS) -> float:
    n = n or MATMUL_N[_kind(device)]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # [n, n]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)  # [n, n]
    ms = median_ms(lambda: torch.mm(a, b, out=out), device, iters, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_rates(device: str) -> Rates:
    rates = Rates(copy_bandwidth(device), matmul_tflops(device))
    logger.info("copy bandwidth %.0f GB/s, bf16 matmul %.1f TFLOP/s on %s", rates.copy_gbps,
                rates.matmul_tflops, device)
    return rates


def gemm_shapes(cfg: Any) -> list[tuple[int, int]]:
    """``(K, N)`` of one layer's weight matmuls: qkv, o, gate_up, down."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]


def matmul_params(cfg: Any) -> int:
    """Weights that go through a matmul in one step (every layer's projections and the LM head)."""
    return cfg.num_hidden_layers * sum(k * n for k, n in gemm_shapes(cfg)) + cfg.vocab_size * cfg.hidden_size


def weight_bytes(cfg: Any, batch: int) -> int:
    """Weight bytes one decode step reads: projections, norms, gathered embedding rows, LM head."""
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    norms = layers * (2 * h + 2 * d) + h  # input/post-attention norms, q/k norms, final norm
    elements = matmul_params(cfg) + norms + batch * h  # the LM head is read in full, tied or not
    return elements * BF16


def kv_bytes(cfg: Any, batch: int, context: int) -> int:
    return 2 * cfg.num_hidden_layers * batch * (context + 1) * cfg.num_key_value_heads * cfg.head_dim * BF16


def floor_bytes(cfg: Any, batch: int, context: int) -> int:
    return weight_bytes(cfg, batch) + kv_bytes(cfg, batch, context)


def floor_ms(cfg: Any, batch: int, context: int, copy_gbps: float) -> float:
    return floor_bytes(cfg, batch, context) / (copy_gbps * 1e9) * 1e3


class GemmStep:
    """Every weight matmul of one decode step on distinct random weights (no L2 reuse across layers)."""

    def __init__(self, cfg: Any, device: str) -> None:
        self.cfg, self.device = cfg, device
        make = lambda k, n: torch.randn(n, k, device=device, dtype=torch.bfloat16)  # noqa: E731  [N, K]
        self.layers = [[make(k, n) for k, n in gemm_shapes(cfg)] for _ in range(cfg.num_hidden_layers)]
        self.head = make(cfg.hidden_size, cfg.vocab_size)  # [V, H]

    @torch.inference_mode()
    def time_ms(self, batch: int, iters: int = ITERS) -> float:
        widths = {w.shape[1] for w in self.layers[0]} | {self.cfg.hidden_size}
        xs = {k: torch.randn(batch, k, device=self.device, dtype=torch.bfloat16) for k in widths}  # [B, K]

        def step() -> None:
            for layer in self.layers:
                for w in layer:
                    torch.mm(xs[w.shape[1]], w.t())  # [B, K] x [K, N]
            torch.mm(xs[self.cfg.hidden_size], self.head.t())  # [B, H] x [H, V]

        if not self.device.startswith("cuda"):
            return median_ms(step, self.device, iters)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: cuBLAS handles and workspaces
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return median_ms(graph.replay, self.device, iters, warmup=2)


COLUMNS = [Column("shape", "shape"), Column("batch", "batch"), Column("context", "context"),
           Column("weight_gb", "weights GB", ".3f"), Column("kv_gb", "KV GB", ".3f"),
           Column("floor_ms", "floor ms", ".3f"), Column("weights_floor_ms", "weights-only floor ms", ".3f"),
           Column("compute_ms", "matmul-rate ms", ".3f"), Column("gemm_ms", "GEMMs-only ms", ".3f"),
           Column("gemm_gbps", "GEMMs GB/s", ".0f"), Column("gemm_x_floor", "GEMMs x weights floor", ".2f")]


def run(settings: Settings, rates: Rates | None = None) -> Table:
    table = open_table(settings, "floor", "Decode floor: bytes per step / copy bandwidth, and GEMMs alone", COLUMNS,
                       ("shape", "batch", "context"))
    rates = rates or measure_rates(settings.device)
    table.meta.update(copy_gbps=rates.copy_gbps, matmul_tflops=rates.matmul_tflops)
    table.note("floor = (weights read + KV read) / copy bandwidth; matmul-rate ms = 2 x matmul weights x batch "
               "/ bf16 matmul rate (a compute floor, shown apart)")
    if not settings.cuda:
        table.note("CPU run: GEMMs-only timed eagerly (no CUDA graph); CPU rates are not GPU figures")
    for shape in settings.shapes:
        cfg = qwen3_config(shape)
        gemm, failure = None, None
        try:
            gemm = GemmStep(cfg, settings.device)
        except Exception as err:  # noqa: BLE001 - every row of the shape records it
            logger.exception("GEMM weights of %s", shape)
            failure = status_of(err)
        for batch in settings.batches:
            timed: dict[int, float] = {}
            for context in settings.contexts:
                base = _floor_row(cfg, shape, batch, context, rates)
                if gemm is None:
                    table.add(dict(base, status=failure))
                    continue
                measure(table, base, lambda: _gemm_row(gemm, cfg, batch, timed, settings.steps,
                                                       base["weights_floor_ms"]))
        del gemm
        release_memory()
    return table


def _floor_row(cfg: Any, shape: str, batch: int, context: int, rates: Rates) -> dict[str, Any]:
    weights_ms = weight_bytes(cfg, batch) / (rates.copy_gbps * 1e9) * 1e3
    return dict(shape=shape, batch=batch, context=context, weight_gb=weight_bytes(cfg, batch) / 1e9,
                kv_gb=kv_bytes(cfg, batch, context) / 1e9, floor_ms=floor_ms(cfg, batch, context, rates.copy_gbps),
                weights_floor_ms=weights_ms,
                compute_ms=2 * matmul_params(cfg) * batch / (rates.matmul_tflops * 1e12) * 1e3)


def _gemm_row(gemm: GemmStep, cfg: Any, batch: int, timed: dict[int, float], iters: int,
              weights_ms: float) -> dict[str, Any]:
    if batch not in timed:  # the GEMMs do not depend on the context: time once per batch
        timed[batch] = gemm.time_ms(batch, iters)
    ms = timed[batch]
    return dict(gemm_ms=ms, gemm_gbps=weight_bytes(cfg, batch) / (ms * 1e6), gemm_x_floor=ms / weights_ms)


def plot(fig, table: Table) -> None:
    ax = fig.subplots()
    for shape in dict.fromkeys(r["shape"] for r in table.rows):
        contexts = list(dict.fromkeys(r["context"] for r in table.rows if r["shape"] == shape))
        for context in contexts:
            rows = sorted((r for r in table.rows if r["shape"] == shape and r["context"] == context),
                          key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["floor_ms"] for r in rows], "o-",
                    label=f"{shape} ctx {context} floor")
        rows = sorted(ok_rows(table, shape=shape, context=contexts[0]), key=lambda r: r["batch"])
        if rows:
            ax.plot([r["batch"] for r in rows], [r["gemm_ms"] for r in rows], "s--", label=f"{shape} GEMMs only")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("ms per decode step")
    ax.legend(fontsize=7)
