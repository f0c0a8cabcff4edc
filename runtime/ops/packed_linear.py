"""Linear layers on the CPU from prepacked weights (oneDNN's blocked layout).

A decode step on the CPU is a chain of small GEMMs (a few rows times each weight) whose time is
the weights' streaming from memory. ``F.linear`` reads a row-major weight at about half the
bandwidth oneDNN reaches on its own blocked copy of it. Inside :func:`packing` (the engine's CPU
forward runs inside it), :func:`linear` makes that copy the first time it is handed a weight and uses it
from then on (the dense weight stays: the embedding and the compiler read it);
:func:`pack_linear_weights` makes them ahead for a model's parameters. Outside, :func:`linear` is
``F.linear`` plus a dictionary lookup. A packed copy is found by the weight's
storage address and checked against its shape, strides and version counter, while the weight it
was made from still lives there (a weak reference): a weight changed in place, freed, or moved is
never served a stale copy (it runs ``F.linear``). Same function as ``F.linear`` (oneDNN accumulates in float32 like it).
Re-measure: ``python -m infer.benchmarks cpu``.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# The row count oneDNN lays a weight out for (none: its default). One layout serves every batch:
# float32 laid out for 8 rows streams as fast at 1 row as at 8; bfloat16's default is the best
# compromise between 1 and 8 rows. Re-measure: ``python -m infer.benchmarks cpu``.
PACK_BATCH_HINT = {torch.float32: (8,), torch.bfloat16: ()}


@dataclass(frozen=True, slots=True)
class _Packed:
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    version: int
    owner: weakref.ref  # the weight it was made from
    packed: torch.Tensor  # oneDNN's opaque layout


_packed: dict[int, _Packed] = {}  # weight storage address -> its packed copy
_lock = threading.Lock()
_enabled = 0  # packing() depth: weights met by linear() are packed


@contextlib.contextmanager
def packing() -> Iterator[None]:
    """Inside, :func:`linear` packs the weights it is handed (once each) and uses the copies."""
    global _enabled
    with _lock:
        _enabled += 1
    try:
        yield
    finally:
        with _lock:
            _enabled -= 1


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in PACKED_DTYPES
            and weight.is_contiguous() and _linear_pointwise is not None and torch.backends.mkldnn.is_available()
            and not torch.is_inference(weight))


def pack_weight(weight: torch.Tensor) -> bool:
    """Make (or refresh) the packed copy of ``weight``; False where it cannot be packed."""
    if not can_pack(weight):
        return False
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), *PACK_BATCH_HINT[weight.dtype])
    key = weight.data_ptr()
    with _lock:
        _packed[key] = _Packed(weight.shape, weight.stride(), weight.dtype, weight._version, weakref.ref(weight), packed)
    weakref.finalize(weight, _forget, key, packed)
    return True


def _forget(key: int, packed: torch.Tensor) -> None:
    with _lock:
        entry = _packed.get(key)
        if entry is not None and entry.packed is packed:
            del _packed[key]


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every 2-d weight of ``model`` that a linear layer (or a tied LM head) reads; returns how
    many. Weights on other devices or in other dtypes are left alone."""
    count = 0
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() == 2:
            count += pack_weight(param)
    return count


def unpack_all() -> None:
    """Forget every packed copy (their memory is freed with the last reference)."""
    with _lock:
        _packed.clear()


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of exactly this weight, or None."""
    key = weight.data_ptr()
    entry = _packed.get(key) if weight.device.type == "cpu" else None
    if entry is None or entry.shape != weight.shape or entry.stride != weight.stride() \
            or entry.dtype != weight.dtype or entry.version != weight._version:
        return None
    owner = entry.owner()
    if owner is None or owner.data_ptr() != key or owner._version != entry.version:
        return None
    return entry.packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from the packed copy of ``weight`` when there is one."""
    packed = packed_copy(weight) if _packed else None
    if packed is None and _enabled and pack_weight(weight):
        packed = packed_copy(weight)
    if packed is None or x.dtype != weight.dtype or x.dim() < 2 or not x.is_contiguous():
        return F.linear(x, weight, bias)
    if x.dim() == 2:
        return _linear_pointwise(x, packed, bias, "none", [], "")
    out = _linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


try:
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a torch built without oneDNN: nothing is ever packed
    _linear_pointwise = None
