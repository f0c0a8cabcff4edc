"""Forward context: hands per-step AttentionMetadata to the opaque paged-attention op.

The metadata is not a graph input, so one traced/compiled graph serves every step; the engine
wraps each model call in ``with forward_context(metadata): model(...)``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from .metadata import AttentionMetadata

_state = threading.local()


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Make ``metadata`` visible to ``get_forward_context()`` for the duration of the block.

    Contexts nest: leaving an inner one restores the outer one, also on exceptions.
    """
    if not isinstance(metadata, AttentionMetadata):
        raise TypeError(f"forward_context expects an AttentionMetadata, got {type(metadata).__name__}")
    previous = getattr(_state, "metadata", None)
    _state.metadata = metadata
    try:
        yield metadata
    finally:
        _state.metadata = previous


def get_forward_context() -> AttentionMetadata:
    """Return the metadata of the innermost active ``forward_context`` on this thread."""
    metadata = getattr(_state, "metadata", None)
    if metadata is None:
        raise RuntimeError(
            "paged_attention ran outside infer.runtime.attention.forward_context(...): "
            "wrap the model call in `with forward_context(metadata):`"
        )
    return metadata


def current_forward_context() -> AttentionMetadata | None:
    """The innermost active metadata, or None outside any ``forward_context``."""
    return getattr(_state, "metadata", None)
