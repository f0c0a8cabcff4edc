"""Reading a safetensors checkpoint into a model's parameters, through their weight_loaders.

Two ways to move the bytes (:func:`infer.models.loader.load_model` picks by device unless told):

- :func:`load_weights`, the simple path here (the default on CPU): ``safe_open(...).get_tensor``
  per tensor, handed to the weight_loader as it is.
- :func:`infer.models.streaming.stream_weights`, the fast path (the default on CUDA): the raw bytes
  are read from the files (``pread``, several threads) into a small ring of staging buffers —
  pinned on CUDA, copied to the device asynchronously while the next buffer is read — and each
  weight_loader runs on the device-side tensor, so tensor-parallel narrowing happens on the device.

Both share this module's file listing and name checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .layers.linear import default_weight_loader

INDEX_FILE = "model.safetensors.index.json"
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints still carry
MAX_LISTED = 8  # names shown in an error message


def check_folder(path: str | Path) -> Path:
    """``path`` as a checkpoint folder: a directory (a Hugging Face Hub id is named as such: only
    local folders load) whose ``config.json`` holds a JSON object. Raises naming what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        text = str(path)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not folder.exists():
            raise FileNotFoundError(
                f"model {text!r} is not a local folder; it looks like a Hugging Face Hub id, and infer loads "
                f"local checkpoint folders only (download it first, e.g. `huggingface-cli download {text} "
                f"--local-dir DIR`, and pass DIR)")
        raise FileNotFoundError(f"checkpoint folder {text!r} does not exist or is not a directory")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {str(folder)!r}")
    try:
        parsed = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{config} must hold a JSON object, got {type(parsed).__name__}")
    return folder


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from the index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except json.JSONDecodeError as e:
            raise ValueError(f"{index} is not valid JSON ({e})") from None
        except (KeyError, TypeError):
            raise ValueError(f"{index} has no 'weight_map' (tensor name -> shard file)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
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


def check_names(model: nn.Module, names: set[str]) -> None:
    """Raise ValueError for checkpoint tensors with no parameter, or parameters with no tensor."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(n for n in names if n not in by_name and not n.endswith(SKIPPED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected weights: {_listing(unexpected)}")
    provided = {id(by_name[n]) for n in names if n in by_name}
    missing = [n for n, p in model.named_parameters() if id(p) not in provided]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {_listing(missing)}")


class FiniteCheck:
    """Whether every loaded floating-point tensor is finite: one device-side flag per tensor
    while the weights load (no synchronisation), read once at the end."""

    def __init__(self) -> None:
        self._flags: list[tuple[str, Path, torch.Tensor]] = []

    def add(self, name: str, file: Path, tensor: torch.Tensor) -> None:
        if not tensor.is_floating_point() or not tensor.numel():
            return
        if tensor.element_size() == 1:  # float8: no isfinite kernel; compared after widening
            tensor = tensor.to(torch.float16)
        self._flags.append((name, file, torch.isfinite(tensor).all()))

    def raise_if_any(self) -> None:
        """ValueError naming the tensors (and their files) that hold NaN or Inf values."""
        if not self._flags:
            return
        finite = torch.stack([flag.to("cpu") for _, _, flag in self._flags]).tolist()
        bad = [f"{name!r} in {file.name}" for (name, file, _), ok in zip(self._flags, finite) if not ok]
        if bad:
            raise ValueError(f"checkpoint has {len(bad)} tensors holding NaN or Inf values: {_listing(bad)}; "
                             "refusing it (every request would sample from non-finite logits)")


def load_into(params: dict[str, nn.Parameter], name: str, file: Path, tensor: torch.Tensor,
              finite: FiniteCheck | None = None) -> None:
    """Run ``name``'s weight_loader on ``tensor``; a ValueError names the tensor and its file."""
    if finite is not None:
        finite.add(name, file, tensor)
    param = params[name]
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor)
    except ValueError as e:
        raise ValueError(f"checkpoint tensor {name!r} in {file.name}: {e}") from e


def load_weights(model: nn.Module, files: list[Path]) -> int:
    """Copy every checkpoint tensor into its parameter through the parameter's weight_loader.

    The simple path: one ``get_tensor`` (CPU) per tensor. Returns the checkpoint bytes loaded.
    """
    names: set[str] = set()
    for file in files:
        with open_shard(file) as f:
            names.update(f.keys())
    check_names(model, names)
    params = dict(model.named_parameters(remove_duplicate=False))
    finite = FiniteCheck()
    loaded = 0
    for file in files:
        with open_shard(file) as f:
            for name in f.keys():
                if name not in params:
                    continue  # skipped buffer, already vetted by check_names
                tensor = read_tensor(f, file, name)
                loaded += tensor.numel() * tensor.element_size()
                load_into(params, name, file, tensor, finite)
    finite.raise_if_any()
    return loaded


def open_shard(file: Path):
    """``safe_open`` of one shard; a file that is not safetensors is a ValueError naming it."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors' own error type names neither the file nor the cause well
        raise ValueError(f"checkpoint shard {file.name} ({file}) is not a readable safetensors file: {e}") from None


def read_tensor(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # a truncated shard: the header lists bytes the file does not hold
        raise ValueError(f"checkpoint tensor {name!r} in {file.name} cannot be read (truncated or corrupt "
                         f"shard?): {e}") from None
