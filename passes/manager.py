"""Runs the ordered list of passes the config asks for, linting and (optionally) dumping."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from torch import fx

from .base import InferPass, PassContext
from .cpu_decompose import CpuDecomposePass
from .defunctionalize import DefunctionalizePass
from .fused_add_rms_norm import FusedAddRMSNormPass
from .gemm_pack import GemmPackPass
from .linear_prologue import LinearProloguePass
from .noop_elimination import NoopEliminationPass
from .qk_norm_rotary import QKNormRotaryPass
from .rms_norm import RMSNormPass
from .silu_and_mul import SiluAndMulPass

logger = logging.getLogger("infer.passes")

FUSED_OP_KINDS = {  # op in the final graph -> the fusions it stands for
    "rms_norm": ("rms_norm",),
    "fused_add_rms_norm": ("fused_add_rms_norm",),
    "silu_and_mul": ("silu_and_mul",),
    "rms_norm_linear": ("rms_norm", "linear_prologue"),
    "add_rms_norm_linear": ("fused_add_rms_norm", "linear_prologue"),
    "silu_mul_linear": ("silu_and_mul", "linear_prologue"),
    "qk_norm_rotary": ("rms_norm", "rms_norm", "qk_norm_rotary"),  # the q and k norms stay counted
}


@dataclass(frozen=True, slots=True)
class PassOptions:
    """Which passes run, and how the manager checks them (the compiler maps its config onto this)."""

    eliminate_noops: bool = True
    fuse_norm: bool = True
    fuse_activation: bool = True
    fuse_gemm: bool = True
    fuse_linear: bool = True
    fuse_qk_norm_rope: bool = True  # rewrites the infer.rms_norm nodes the norm pass made
    decompose_on_cpu: bool = True  # ops without a CPU kernel spelled out for the inner compiler
    lint: bool = True
    dump_graphs: bool = False

    @classmethod
    def of(cls, config: object) -> "PassOptions":
        """The options of any object with these attributes (the compiler's config)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def build_passes(config: PassOptions, context: PassContext) -> list[InferPass]:
    """The explicit, ordered pass list for this config."""
    passes: list[InferPass] = []
    if config.eliminate_noops:
        passes.append(NoopEliminationPass(context))
    if config.fuse_norm:
        passes += [RMSNormPass(context), FusedAddRMSNormPass(context)]
        if config.fuse_qk_norm_rope:  # rewrites the infer.rms_norm nodes the norm pass made
            passes.append(QKNormRotaryPass(context))
    if config.fuse_gemm:
        passes.append(GemmPackPass(context))
    if config.fuse_activation:
        passes.append(SiluAndMulPass(context))
    if config.fuse_linear:
        passes.append(LinearProloguePass(context))
    if config.decompose_on_cpu:  # after qk_norm_rotary: only the rotaries it left alone
        passes.append(CpuDecomposePass(context))
    passes.append(DefunctionalizePass(context))  # always: keeps the KV cache written in place
    return passes


class PassManager:
    def __init__(self, config: PassOptions, context: PassContext) -> None:
        self.config = config
        self.context = context
        self.passes = build_passes(config, context)

    def __call__(self, graph: fx.Graph) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.passes:
            if self.config.dump_graphs:
                logger.debug("graph before %s:\n%s", p.name, graph)
            start = time.perf_counter()
            rewrites = p(graph)
            graph.eliminate_dead_code()
            if self.config.lint:
                graph.lint()
            counts[p.name] = counts.get(p.name, 0) + rewrites
            logger.debug("%s: %d rewrites in %.1f ms", p.name, rewrites, 1e3 * (time.perf_counter() - start))
            if self.config.dump_graphs:
                logger.debug("graph after %s:\n%s", p.name, graph)
        self._count_fused_ops(graph)
        return counts

    def _count_fused_ops(self, graph: fx.Graph) -> None:
        """Norm and activation fusions are counted by what the final graph holds."""
        for node in graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "infer":
                for kind in FUSED_OP_KINDS.get(node.target._opname, ()):
                    self.context.count_fusion(kind)

    def uuid(self) -> str:
        return "-".join(p.uuid() for p in self.passes)
