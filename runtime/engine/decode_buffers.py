"""Static decode inputs for full CUDA graphs: one set of buffers per captured batch size.

A full graph holds the attention op, which reads its metadata from device memory; the graph may
only replay with the buffers it was captured with, so each step writes into them in place.

A step is assembled in host staging arrays (pinned on CUDA) and copied over asynchronously. The
staged block-table rows are kept between steps: a row is rewritten only when its sequence's table
is a different list or grew, and only the span of changed rows is copied. Block tables must
therefore only be replaced or appended to, never edited in place (the :class:`BlockManager` way).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..attention.metadata import PAD_SLOT
from ..attention import AttentionMetadata

_UNKNOWN: list[int] = []  # stands for a row whose device contents are unknown (never a real table)


class HostStaging:
    """Host copies of one buffer set, and which block-table list each staged row came from."""

    def __init__(self, size: int, max_blocks_per_seq: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.values = torch.zeros(3, size, dtype=torch.int64, pin_memory=pin)  # [3, B] ids, positions, slots
        self.seq_lens = torch.zeros(size, dtype=torch.int32, pin_memory=pin)  # [B]
        self.tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)  # [B, W]
        self.values_np, self.seq_lens_np = self.values.numpy(), self.seq_lens.numpy()
        self.tables_np = self.tables.numpy()
        self.values_np[2] = PAD_SLOT
        self.row_index = np.arange(size)
        self.row_tables: list[list[int] | None] = [None] * size  # the list each row was staged from
        self.row_lens = [0] * size  # blocks staged per row
        self.row_lens_np = np.zeros(size, dtype=np.int64)
        self.copied = torch.cuda.Event() if pin else None

    def wait(self) -> None:
        """Block until the last copies out of the staging arrays are done (they may be rewritten)."""
        if self.copied is not None:
            self.copied.synchronize()

    def stage_tables(self, tables: list[list[int]]) -> tuple[int, int]:
        """Bring rows ``0..len(tables)-1`` up to date and empty the rest; returns the changed span."""
        n, rows, lens = len(tables), self.row_tables, self.row_lens
        changed = [i for i, (table, old, k) in enumerate(zip(tables, rows, lens))
                   if table is not old or len(table) != k]
        changed += [i for i in range(n, len(rows)) if rows[i] is not None]
        if not changed:
            return 0, 0
        width = self.tables_np.shape[1]
        too_long = [i for i in changed if i < n and len(tables[i]) > width]
        if too_long:
            i = too_long[0]
            raise ValueError(f"row {i}: block table of {len(tables[i])} blocks exceeds max_blocks_per_seq={width}")
        self._move_rows([i for i in changed if i < n and tables[i] is not rows[i]], tables)
        for i in changed:
            table = tables[i] if i < n else None
            m, k = (len(table) if table is not None else 0), lens[i]
            start = k if table is rows[i] else 0  # a staged list: only its appended blocks are new
            if m > start:
                self.tables_np[i, start:m] = table[start:m]
            if k > m:
                self.tables_np[i, m:k] = 0
            rows[i], lens[i], self.row_lens_np[i] = table, m, m
        return changed[0], changed[-1] + 1

    def _move_rows(self, replaced: list[int], tables: list[list[int]]) -> None:
        """Rows whose table is staged in another row (the batch shifted) take that row's contents."""
        if not replaced:
            return
        staged = {id(table): j for j, table in enumerate(self.row_tables) if table is not None}
        found = [staged.get(id(tables[i])) for i in replaced]
        dst = [i for i, j in zip(replaced, found) if j is not None]
        if not dst:
            return
        src = [j for j in found if j is not None]
        src_lens = [self.row_lens[j] for j in src]
        self.tables_np[dst] = self.tables_np[src]  # the gather copies first: overlapping moves are safe
        for i, k in zip(dst, src_lens):
            self.row_tables[i], self.row_lens[i] = tables[i], k

    def forget(self) -> None:
        """Assume nothing about the device rows: the next fill rewrites and copies all of them."""
        self.row_tables = [_UNKNOWN] * len(self.row_tables)
        self.row_lens = [self.tables_np.shape[1]] * len(self.row_lens)

    def reset(self) -> None:
        """All rows empty, on the host and (the caller's job) on the device."""
        self.wait()
        self.tables_np.fill(0)
        self.row_tables = [None] * len(self.row_tables)
        self.row_lens = [0] * len(self.row_lens)
        self.row_lens_np.fill(0)


@dataclass(slots=True)
class DecodeBuffers:
    input_ids: Tensor  # [B] int64
    positions: Tensor  # [B] int64
    metadata: AttentionMetadata  # every tensor static; B sequences of one query token each
    rows: Tensor  # [B] int64 arange: the rows that sample are rows[:n]
    host: HostStaging

    @classmethod
    def allocate(cls, size: int, max_blocks_per_seq: int, max_model_len: int, device) -> "DecodeBuffers":
        device = torch.device(device)
        ints = dict(dtype=torch.int32, device=device)
        metadata = AttentionMetadata(
            slot_mapping=torch.full((size,), PAD_SLOT, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(size + 1, **ints),
            seq_lens=torch.zeros(size, **ints),
            block_tables=torch.zeros(size, max_blocks_per_seq, **ints),
            max_query_len=1, max_seq_len=max_model_len, num_seqs=size, num_tokens=size)
        zeros = torch.zeros(size, dtype=torch.int64, device=device)
        return cls(zeros, zeros.clone(), metadata, torch.arange(size, device=device),
                   HostStaging(size, max_blocks_per_seq, device))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def fill(self, ids: list[int] | None, positions: list[int], tables: list[list[int]], block_size: int) -> None:
        """Write one decode step (token `positions[i]` of sequence `i`); rows past `len(positions)`
        are dummy sequences of length 0 whose slot is -1 (they write nothing and read nothing).

        ``ids=None``: the ids are on the device only (sampled by the step before); the caller
        writes ``input_ids[:n]`` after this call, in stream order (the copy here writes stale ids).
        """
        n, size = len(positions), self.size
        if n > size or (ids is not None and len(ids) != n) or len(tables) != n:
            raise ValueError(f"need at most {size} ids with one position and one block table each, got "
                             f"{'no' if ids is None else len(ids)} ids, {n} positions, {len(tables)} tables")
        host = self.host
        host.wait()
        values, seq_lens = host.values_np, host.seq_lens_np
        if ids is not None:
            values[0, :n] = ids
        values[1, :n] = positions
        lo, hi = host.stage_tables(tables)
        pos = values[1, :n]
        blocks = pos // block_size
        if n and (blocks >= host.row_lens_np[:n]).any():
            i = int(np.argmax(blocks >= host.row_lens_np[:n]))
            host.forget()  # the staged rows were not copied
            raise ValueError(f"row {i}: position {pos[i]} is past its block table of {len(tables[i])} blocks")
        values[2, :n] = host.tables_np[host.row_index[:n], blocks] * block_size + pos % block_size
        seq_lens[:n] = pos + 1
        values[:2, n:] = 0
        values[2, n:] = PAD_SLOT
        seq_lens[n:] = 0
        self._copy_in(lo, hi)

    def _copy_in(self, lo: int, hi: int) -> None:
        """Copy the staged step to the device buffers (block-table rows ``lo..hi-1`` only)."""
        host, md = self.host, self.metadata
        self.input_ids.copy_(host.values[0], non_blocking=True)
        self.positions.copy_(host.values[1], non_blocking=True)
        md.slot_mapping.copy_(host.values[2], non_blocking=True)
        md.seq_lens.copy_(host.seq_lens, non_blocking=True)
        if hi > lo:
            md.block_tables[lo:hi].copy_(host.tables[lo:hi], non_blocking=True)
        if host.copied is not None:
            host.copied.record(torch.cuda.current_stream(self.input_ids.device))

    def clear(self) -> None:
        """All rows dummy (used for warm-up and capture)."""
        self.host.reset()
        self.input_ids.zero_()
        self.positions.zero_()
        self.metadata.slot_mapping.fill_(PAD_SLOT)
        self.metadata.seq_lens.zero_()
        self.metadata.block_tables.zero_()
