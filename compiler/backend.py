"""The `torch.compile(..., backend="infer")` entry point (registered as a Dynamo backend)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import fx

from .config import CompilerConfig
from .errors import InferUsageError
from .pipeline import compile_graph


def infer_backend(gm: fx.GraphModule, example_inputs: Sequence, options: Mapping[str, Any] | None = None,
                  mode: str | None = None, **unexpected: Any) -> Callable:
    """Dynamo calls this with each captured graph; `options` come from `torch.compile`."""
    if mode is not None:
        raise InferUsageError(f"backend 'infer' takes no mode (got mode={mode!r}); pass options={{...}} "
                              f"with any of: {', '.join(CompilerConfig.option_names())}")
    if unexpected:
        raise InferUsageError(f"backend 'infer' got unexpected arguments {sorted(unexpected)}")
    try:
        config = CompilerConfig.from_options(options)
    except ValueError as e:
        raise InferUsageError(str(e)) from None
    return compile_graph(gm, example_inputs, config)
