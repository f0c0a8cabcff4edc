"""Runs the ordered list of passes the config asks for, linting and (optionally) dumping."""
from __future__ import annotations

import logging
import time

from torch import fx

from ..compiler.config import CompilerConfig
from .base import InferPass, PassContext
from .noop_elimination import NoopEliminationPass

logger = logging.getLogger("infer.passes")


def build_passes(config: CompilerConfig, context: PassContext) -> list[InferPass]:
    """The explicit, ordered pass list for this config."""
    passes: list[InferPass] = []
    if config.eliminate_noops:
        passes.append(NoopEliminationPass(context))
    return passes


class PassManager:
    def __init__(self, config: CompilerConfig, context: PassContext) -> None:
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
        return counts

    def uuid(self) -> str:
        return "-".join(p.uuid() for p in self.passes)
