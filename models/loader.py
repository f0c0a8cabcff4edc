"""Build a model from a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).

Parameter names are HF's own, so checkpoint names map one to one; each parameter's
``weight_loader`` narrows the full tensor to this rank's tensor-parallel shard. The bytes move
through :mod:`.checkpoint` (streamed through pinned staging buffers on CUDA).

The layers allocate their parameters with ``torch.empty`` (no random init to skip): the checkpoint
overwrites every one of them, and the reader rejects checkpoints that lack one.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import check_folder, checkpoint_files, load_weights
from .registry import model_class_for
from .streaming import StagingConfig, stream_weights

__all__ = ["checkpoint_files", "default_dtype", "load_model", "load_weights", "resolve_dtype", "stream_weights"]

logger = logging.getLogger(__name__)



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


@torch.no_grad()  # not inference_mode: the parameters must stay ordinary tensors for the compiler
def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    fast: bool | None = None,
    staging: StagingConfig | None = None,
) -> tuple[nn.Module, Any]:
    """Build the model a HF checkpoint folder describes and load its weights.

    Args:
        path: folder holding ``config.json`` and one or more ``*.safetensors`` files
            (sharded checkpoints through ``model.safetensors.index.json``).
        dtype: parameter dtype; ``None``/``"auto"`` takes the config's dtype, else float32.
        device: where parameters and buffers live.
        fast: :func:`stream_weights` (True) or :func:`load_weights` (False); ``None``: stream
            on CUDA, the simple path elsewhere.
        staging: the streamed path's staging ring (default :class:`StagingConfig`).
    Returns:
        ``(model, hf_config)`` with the model in eval mode.
    """
    start = time.perf_counter()
    path = check_folder(path)
    from transformers import AutoConfig  # heavy import, deferred to first use

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # not JSON, an unknown model_type, a bad field
        raise ValueError(f"transformers cannot read {path / 'config.json'}: {e}") from None
    model_cls = model_class_for(config)
    files = checkpoint_files(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    if fast is None:
        fast = device.type == "cuda"
    with torch.device(device), default_dtype(dtype):
        model = model_cls(config)
    model.to(device)  # buffers computed on CPU on purpose (rotary tables) follow the parameters
    built = time.perf_counter()
    loaded = stream_weights(model, files, staging) if fast else load_weights(model, files)
    seconds = time.perf_counter() - start
    logger.info(
        "loaded %s from %s (%d files, %s, %s) in %.2f s: %.2f GB at %.2f GB/s (build %.2f s, %s path)",
        model_cls.__name__, path, len(files), dtype, device, seconds, loaded / 1e9, loaded / 1e9 / seconds,
        built - start, "streamed" if fast else "simple",
    )
    return model.eval(), config
