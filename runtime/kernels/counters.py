"""Arrival counters: zeroed int32 buffers with which the programs of a split computation elect the
last one in, which then combines the partial results (decode attention's splits, the skinny GEMM's
split K). Every launch leaves the counters it used at zero again."""
from __future__ import annotations

import torch
from torch import Tensor

from .decode_plan import sm_count

_BUFFERS: dict[tuple[str, int], list[Tensor]] = {}  # (device type, index) -> buffers, newest last


def arrival_counters(device: torch.device, n: int) -> Tensor | None:
    """A zeroed int32 buffer of at least ``n`` counters on ``device``, or None while a CUDA graph is
    being captured and no buffer is large enough (the caller then launches without a combine).

    A buffer is never freed or replaced: graphs captured with it keep its address, so a larger
    need adds a new one. Kernels on one stream share it: each uses it only after its PDL wait, when
    the kernel before it has finished and left its counters at zero."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    buffers = _BUFFERS.setdefault((device.type, index or 0), [])
    if buffers and buffers[-1].numel() >= n:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    buffers.append(torch.zeros(max(n, 4 * sm_count(device)), dtype=torch.int32, device=device))
    return buffers[-1]


def all_buffers() -> list[Tensor]:
    """Every counter buffer allocated so far (tests check that launches leave them at zero)."""
    return [b for buffers in _BUFFERS.values() for b in buffers]
