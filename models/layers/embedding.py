"""Vocabulary-parallel token embedding and LM head.

Each rank holds ``ceil(V / tp)`` consecutive vocabulary rows; the last rank's tail past ``V``
is zero padding. The embedding masks ids outside this rank's range and all-reduces; the head
computes this rank's logit columns and all-gathers them (every rank ends with full logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...runtime import distributed
from .linear import dense, resolve_tp


class VocabParallelEmbedding(nn.Module):
    """``ids [T] -> embeddings [T, D]`` with the vocabulary split over tensor-parallel ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"need a positive vocabulary and width, got {num_embeddings} x {embedding_dim}")
        self.tp_rank, self.tp_size = resolve_tp(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.rows_per_rank * self.tp_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the full ``[V, D]`` table; padding rows become zero."""
        expected = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"shape mismatch: expected {expected}, got {tuple(loaded_weight.shape)}")
        rows = max(self.vocab_end - self.vocab_start, 0)
        param.data[rows:].zero_()
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [T, D]
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = torch.where(mask, input_ids - self.vocab_start, 0)  # [T]
        y = F.embedding(local_ids, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)  # [T, D]
        return distributed.all_reduce(y)

    def extra_repr(self) -> str:
        rows = f"rows=[{self.vocab_start}, {self.vocab_end})"
        return f"{self.num_embeddings}, {self.embedding_dim}, {rows}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """``hidden [N, D] -> logits [N, V]``; optionally shares the embedding's weight (tied).

    With ``tie_to`` the head registers the embedding's own Parameter, so loading either
    ``lm_head.weight`` or ``model.embed_tokens.weight`` fills both.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tie_to: VocabParallelEmbedding | None = None,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank=tp_rank, tp_size=tp_size)
        if tie_to is not None:
            same = (tie_to.num_embeddings, tie_to.embedding_dim, tie_to.tp_rank, tie_to.tp_size)
            if same != (num_embeddings, embedding_dim, self.tp_rank, self.tp_size):
                raise ValueError(
                    f"cannot tie the LM head ({num_embeddings} x {embedding_dim}, tp {self.tp_rank}/"
                    f"{self.tp_size}) to an embedding of {tie_to.num_embeddings} x {tie_to.embedding_dim}, "
                    f"tp {tie_to.tp_rank}/{tie_to.tp_size}"
                )
            self.weight = tie_to.weight
        self.tied = tie_to is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dense(hidden, self.weight)  # [N, V/tp]
        if self.tp_size == 1:
            return logits
        return distributed.all_gather_last_dim(logits)[..., : self.num_embeddings]  # [N, V]
