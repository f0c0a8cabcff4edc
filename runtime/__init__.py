"""Runtime: custom ops and kernels, paged attention, the engine (``LLM``, ``SamplingParams``).

The engine names are imported lazily: ``import infer.runtime.attention`` (done by every model)
does not pull in the engine, the loader or transformers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.llm import LLM, RequestOutput
    from .engine.sampling import SamplingParams

_LAZY = {"LLM": ".engine.llm", "RequestOutput": ".engine.llm", "SamplingParams": ".engine.sampling"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name], __name__), name)
