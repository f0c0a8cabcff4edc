"""Build a model from a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).

Parameter names are HF's own, so checkpoint names map one to one; each parameter's
``weight_loader`` narrows the full tensor to this rank's tensor-parallel shard. The bytes move
through :mod:`.checkpoint` (streamed through pinned staging buffers on CUDA).

The model is built with :func:`skip_param_init`: parameters are not randomly initialised, since the
checkpoint overwrites every one of them (the checkpoint reader rejects checkpoints that lack one).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_files, load_weights, stream_weights
from .registry import model_class_for

__all__ = ["checkpoint_files", "default_dtype", "load_model", "load_weights", "resolve_dtype", "skip_param_init",
           "stream_weights"]

logger = logging.getLogger(__name__)

# torch.nn.init functions made no-ops for parameters while a model is built (skip_param_init)
INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


def resolve_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    """``None``/``"auto"``: the config's ``dtype`` (or legacy ``torch_dtype``), else float32."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'float16', 'bfloat16'")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default floating dtype (restored on exit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def skip_param_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers no-ops on ``nn.Parameter``s (restored on exit).

    ``reset_parameters`` of ``nn.Linear``/``nn.Embedding`` and the like go through these, so a model
    built inside allocates its parameters without filling them: the checkpoint overwrites every one.
    Plain tensors and buffers are still initialised (a buffer computed in ``__init__`` keeps its
    values). The patch is process-wide while it lasts, as transformers' ``no_init_weights`` is.
    """
    originals = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS if hasattr(nn.init, name)}

    def skipping(original: Callable[..., Any]) -> Callable[..., Any]:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if isinstance(tensor, nn.Parameter) else original(tensor, *args, **kwargs)

        return init

    for name, original in originals.items():
        setattr(nn.init, name, skipping(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


@torch.no_grad()  # not inference_mode: the parameters must stay ordinary tensors for the compiler
def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    fast: bool | None = None,
) -> tuple[nn.Module, Any]:
    """Build the model a HF checkpoint folder describes and load its weights.

    Args:
        path: folder holding ``config.json`` and one or more ``*.safetensors`` files
            (sharded checkpoints through ``model.safetensors.index.json``).
        dtype: parameter dtype; ``None``/``"auto"`` takes the config's dtype, else float32.
        device: where parameters and buffers live.
        fast: :func:`stream_weights` (True) or :func:`load_weights` (False); ``None``: stream
            on CUDA, the simple path elsewhere.
    Returns:
        ``(model, hf_config)`` with the model in eval mode.
    """
    start = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {str(path)!r}")
    from transformers import AutoConfig  # heavy import, deferred to first use

    config = AutoConfig.from_pretrained(str(path))
    model_cls = model_class_for(config)
    files = checkpoint_files(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    if fast is None:
        fast = device.type == "cuda"
    with torch.device(device), default_dtype(dtype), skip_param_init():
        model = model_cls(config)
    model.to(device)  # buffers computed on CPU on purpose (rotary tables) follow the parameters
    built = time.perf_counter()
    loaded = stream_weights(model, files) if fast else load_weights(model, files)
    seconds = time.perf_counter() - start
    logger.info(
        "loaded %s from %s (%d files, %s, %s) in %.2f s: %.2f GB at %.2f GB/s (build %.2f s, %s path)",
        model_cls.__name__, path, len(files), dtype, device, seconds, loaded / 1e9, loaded / 1e9 / seconds,
        built - start, "streamed" if fast else "simple",
    )
    return model.eval(), config
