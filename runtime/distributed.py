"""Minimal tensor-parallel state: the torch.distributed world *is* the tensor-parallel group.

Nothing here is global beyond what ``torch.distributed`` already holds: rank and size are read
from the default process group when it is initialized, and are ``0`` / ``1`` otherwise.

Collectives are the out-of-place functional ones (``torch.distributed._functional_collectives``),
which Dynamo traces into the graph instead of breaking it; at size 1 they are skipped entirely so
a single-GPU graph holds no communication op at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch >= 2.13 renamed all_gather_tensor (gather along dim 0) to all_gather_single
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 without torch.distributed)."""
    return dist.get_rank() if is_initialized() else 0


def tp_size() -> int:
    """Number of tensor-parallel ranks (1 without torch.distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def check_rank(rank: int, size: int) -> None:
    """Raise ValueError unless ``0 <= rank < size``."""
    if size < 1:
        raise ValueError(f"tp_size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"tp_rank must be in [0, {size}), got {rank}")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks (out of place); returns ``x`` itself at size 1."""
    if tp_size() == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim: ``[..., N] -> [..., size*N]``."""
    size = tp_size()
    if size == 1:
        return x
    gathered = funcol.wait_tensor(_all_gather_dim0(x.contiguous(), 0, dist.group.WORLD))
    # gathered: [size*M, ..., N] stacked along dim 0 -> split per rank and join on the last dim
    return torch.cat(gathered.chunk(size, dim=0), dim=-1)
