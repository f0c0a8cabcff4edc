"""Static decode inputs for full CUDA graphs: one set of buffers per captured batch size.

A full graph holds the attention op, which reads its metadata from device memory; the graph may
only replay with the buffers it was captured with, so each step writes into them in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import AttentionMetadata

PAD_SLOT = -1


@dataclass(slots=True)
class DecodeBuffers:
    input_ids: Tensor  # [B] int64
    positions: Tensor  # [B] int64
    metadata: AttentionMetadata  # every tensor static; B sequences of one query token each
    rows: Tensor  # [B] int64 arange: the rows that sample are rows[:n]

    @classmethod
    def allocate(cls, size: int, max_blocks_per_seq: int, max_model_len: int, device) -> "DecodeBuffers":
        ints = dict(dtype=torch.int32, device=device)
        metadata = AttentionMetadata(
            slot_mapping=torch.full((size,), PAD_SLOT, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(size + 1, **ints),
            seq_lens=torch.zeros(size, **ints),
            block_tables=torch.zeros(size, max_blocks_per_seq, **ints),
            max_query_len=1, max_seq_len=max_model_len, num_seqs=size, num_tokens=size)
        zeros = torch.zeros(size, dtype=torch.int64, device=device)
        return cls(zeros, zeros.clone(), metadata, torch.arange(size, device=device))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def fill(self, ids: list[int], positions: list[int], tables: list[list[int]], block_size: int) -> None:
        """Write one decode step (token `positions[i]` of sequence `i`); rows past `len(ids)` are
        dummy sequences of length 0 whose slot is -1 (they write nothing and read nothing)."""
        n, size = len(ids), self.size
        slots = [table[p // block_size] * block_size + p % block_size for p, table in zip(positions, tables)]
        width = self.metadata.block_tables.shape[1]
        rows = [table + [0] * (width - len(table)) for table in tables] + [[0] * width] * (size - n)
        host = torch.tensor([ids + [0] * (size - n), positions + [0] * (size - n),
                             slots + [PAD_SLOT] * (size - n), [p + 1 for p in positions] + [0] * (size - n)],
                            dtype=torch.int64)  # [4, B]
        self.input_ids.copy_(host[0], non_blocking=True)
        self.positions.copy_(host[1], non_blocking=True)
        self.metadata.slot_mapping.copy_(host[2], non_blocking=True)
        self.metadata.seq_lens.copy_(host[3], non_blocking=True)
        self.metadata.block_tables.copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)

    def clear(self) -> None:
        """All rows dummy (used for warm-up and capture)."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.metadata.slot_mapping.fill_(PAD_SLOT)
        self.metadata.seq_lens.zero_()
        self.metadata.block_tables.zero_()
