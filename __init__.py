"""infer: a torch.compile backend, FX fusion passes and a lean runtime for LLM inference.

``from infer import LLM, SamplingParams`` loads the engine on first use, so that
``import infer.compiler`` (what ``backend="infer"`` needs) stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime.engine.llm import LLM, RequestOutput
    from .runtime.engine.sampling import SamplingParams

__version__ = "0.1.0"
_ENGINE = {"LLM": ".runtime.engine.llm", "RequestOutput": ".runtime.engine.llm",
           "SamplingParams": ".runtime.engine.sampling"}
__all__ = sorted(_ENGINE)


def __getattr__(name: str) -> Any:
    if name not in _ENGINE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_ENGINE[name], __name__), name)
