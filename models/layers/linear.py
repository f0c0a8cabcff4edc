"""Tensor-parallel linear layers that load their own shard of a full checkpoint tensor.

Traced, forward is a plain ``F.linear`` so the compiler's GEMM passes see ordinary linears; fusing
q/k/v or gate/up projections is the compiler's job, not the model's. Run eagerly, it is
:func:`infer.runtime.ops.packed_linear.linear`: the same function, from a prepacked copy of the
weight where the engine made one (CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime import distributed
from ...runtime.ops import packed_linear


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as the compiler sees it; eagerly, from the weight's packed copy if it has one."""
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return packed_linear.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copy a full (unsharded) checkpoint tensor into ``param``, casting to its dtype."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: expected {tuple(param.shape)}, got {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def load_shard(param: nn.Parameter, loaded_weight: torch.Tensor, dim: int, shard: int, num_shards: int) -> None:
    """Copy shard ``shard`` of ``num_shards`` equal slices along ``dim`` into ``param``.

    Raises ValueError when the full tensor does not have ``param``'s shape times ``num_shards``
    along ``dim``.
    """
    expected = list(param.shape)
    expected[dim] *= num_shards
    if list(loaded_weight.shape) != expected:
        raise ValueError(f"shape mismatch: expected {tuple(expected)}, got {tuple(loaded_weight.shape)}")
    size = param.shape[dim]
    param.data.copy_(loaded_weight.narrow(dim, shard * size, size))


def resolve_tp(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """Fill ``None`` rank/size from ``runtime.distributed`` and validate them."""
    rank = distributed.tp_rank() if tp_rank is None else tp_rank
    size = distributed.tp_size() if tp_size is None else tp_size
    distributed.check_rank(rank, size)
    return rank, size


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split over ranks: each rank returns its slice.

    With ``num_replicas > 1`` groups of that many consecutive ranks hold the *same* shard (used
    for k/v projections when there are fewer kv heads than ranks): the output is split into
    ``tp_size // num_replicas`` shards and rank ``r`` holds shard ``r // num_replicas``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        num_replicas: int = 1,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = resolve_tp(tp_rank, tp_size)
        if num_replicas < 1 or self.tp_size % num_replicas != 0:
            raise ValueError(f"num_replicas={num_replicas} must be >= 1 and divide tp_size={self.tp_size}")
        self.num_shards = num_shards = self.tp_size // num_replicas
        if out_features % num_shards != 0:
            raise ValueError(
                f"out_features={out_features} is not divisible by the {num_shards} shards "
                f"(tp_size={self.tp_size}, num_replicas={num_replicas})"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.shard = self.tp_rank // num_replicas
        self.out_per_rank = out_features // num_shards
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Narrow the full ``[out, in]`` weight (or ``[out]`` bias) to this rank's rows."""
        load_shard(param, loaded_weight, 0, self.shard, self.num_shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)  # [T, out/tp]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_per_rank} (of {self.out_features}), tp={self.tp_size}"


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split over ranks; partial sums are all-reduced.

    The input is this rank's slice of the features (what a column-parallel layer produced);
    the bias is added once, after the all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = resolve_tp(tp_rank, tp_size)
        if in_features % self.tp_size != 0:
            raise ValueError(f"in_features={in_features} is not divisible by tp_size={self.tp_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.in_per_rank = in_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Narrow the full ``[out, in]`` weight to this rank's input columns."""
        load_shard(param, loaded_weight, 1, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return dense(x, self.weight, self.bias)  # [T, out]
        y = distributed.all_reduce(dense(x, self.weight))  # [T, out]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_per_rank} (of {self.in_features}), out={self.out_features}, tp={self.tp_size}"
