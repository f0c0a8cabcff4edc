"""Turns the transformed graph into the final callable (one piece until the graph is split)."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import fx

from .config import CompilerConfig
from .inner import inner_compile
from .report import CompileReport


def compile_pieces(gm: fx.GraphModule, example_inputs: Sequence, is_static: list[bool],
                   config: CompilerConfig, report: CompileReport) -> Callable:
    report.pieces = 1
    return inner_compile(gm, example_inputs, config.inner_compiler)
