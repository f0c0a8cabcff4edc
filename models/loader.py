"""Build a model from a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).

Parameter names are HF's own, so checkpoint names map one to one; each parameter's
``weight_loader`` narrows the full tensor to this rank's tensor-parallel shard.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .layers.linear import default_weight_loader
from .registry import model_class_for

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints still carry
MAX_LISTED = 8  # names shown in an error message


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


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from the index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {absent[:MAX_LISTED]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path} (only safetensors checkpoints are supported)")
    return files


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _check_names(model: nn.Module, names: set[str]) -> None:
    """Raise ValueError for checkpoint tensors with no parameter, or parameters with no tensor."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(n for n in names if n not in by_name and not n.endswith(SKIPPED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected weights: {_listing(unexpected)}")
    provided = {id(by_name[n]) for n in names if n in by_name}
    missing = [n for n, p in model.named_parameters() if id(p) not in provided]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {_listing(missing)}")


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its parameter through the parameter's weight_loader."""
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.update(f.keys())
    _check_names(model, names)
    params = dict(model.named_parameters(remove_duplicate=False))
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in params:
                    continue  # skipped buffer, already vetted by _check_names
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_tensor(name))
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} in {file.name}: {e}") from e


@torch.no_grad()  # not inference_mode: the parameters must stay ordinary tensors for the compiler
def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Any]:
    """Build the model a HF checkpoint folder describes and load its weights.

    Args:
        path: folder holding ``config.json`` and one or more ``*.safetensors`` files
            (sharded checkpoints through ``model.safetensors.index.json``).
        dtype: parameter dtype; ``None``/``"auto"`` takes the config's dtype, else float32.
        device: where parameters and buffers live.
    Returns:
        ``(model, hf_config)`` with the model in eval mode.
    """
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
    with torch.device(device), default_dtype(dtype):
        model = model_cls(config)
    model.to(device)  # buffers computed on CPU on purpose (rotary tables) follow the parameters
    load_weights(model, files)
    logger.info("loaded %s from %s (%d files, %s, %s)", model_cls.__name__, path, len(files), dtype, device)
    return model.eval(), config
