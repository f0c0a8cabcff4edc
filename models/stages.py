"""The stages of a decoder-only forward, for engines that compile them one by one.

``prepare(model, ids, positions) -> (hidden, residual, *shared)``, then for every decoder layer
``layer(layer_module, hidden, residual, *shared) -> (hidden, residual)``, then
``finish(model, hidden, residual) -> hidden``. Every layer runs the same ``layer`` function
with its own module, so one compiled graph (weights as inputs) serves all of them: tracing
and compiling cost one layer instead of the whole stack.
"""
from __future__ import annotations

from typing import Callable, NamedTuple


class Stages(NamedTuple):
    """Unbound functions (module first) for the three stages of a forward."""

    prepare: Callable
    layer: Callable
    finish: Callable
