"""Errors the backend raises for the user's mistakes.

Dynamo wraps any exception a backend raises in `BackendCompilerFailed`, burying the message under
its own stack trace. Errors that derive from Dynamo's `ShortenTraceback` pass through unchanged, so
the user sees a plain `ValueError` that names the bad value.
"""
from __future__ import annotations

from ..torch_internals import PassThroughError as _PassThrough


class InferUsageError(ValueError, _PassThrough):
    """A bad option, bad input or unsupported mode given to the `infer` backend."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None
