"""The torch.compile backend: config, pipeline, graph split, piecewise runner, report."""
from .config import CompilerConfig
from .errors import InferUsageError
from .report import CompileReport, compilation_count, last_report


def infer_backend(gm, example_inputs, **kwargs):
    """The backend function (also reachable as `torch.compile(..., backend="infer")`)."""
    from .backend import infer_backend as backend
    return backend(gm, example_inputs, **kwargs)


__all__ = ["CompilerConfig", "CompileReport", "InferUsageError", "compilation_count", "infer_backend", "last_report"]
