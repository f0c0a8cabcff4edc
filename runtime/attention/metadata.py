"""Per-step attention metadata: which cache slots the new tokens go to and what each query sees.

A batch holds ``B`` sequences and ``T`` new (query) tokens, laid out sequence after sequence.
Sequence ``b`` contributes ``query_len_b`` tokens; they are the *last* ``query_len_b`` positions
of its ``seq_len_b`` tokens, so a prefill with a cached prefix has ``seq_len_b > query_len_b``
and a decode step has ``query_len_b == 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

PAD_SLOT = -1  # slot_mapping value of a padding token: nothing is written to the cache


def host_to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values)`` on ``device``. For CUDA, through pinned memory without blocking the
    host: a copy from pageable memory waits for the device to finish its queued work, and a
    prefill step builds its inputs while the previous step may still run (the pinned block is not
    reused before the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class AttentionMetadata:
    """Device tensors and host ints describing one forward step of paged attention.

    Attributes:
        slot_mapping: ``[T] int64`` cache slot (``block_id * block_size + offset``) of each new
            token; ``-1`` marks a padding token that must not be written. May be shorter than the
            op's ``T``: the missing tail counts as padding.
        query_start_loc: ``[B+1] int32`` cumulative query lengths (``query_start_loc[0] == 0``).
        seq_lens: ``[B] int32`` KV length of each sequence, this step's new tokens included.
        block_tables: ``[B, max_blocks_per_seq] int32`` physical block ids; unused entries may
            hold any valid block id (0 is conventional).
        max_query_len: host-side max over ``query_len_b``.
        max_seq_len: host-side max over ``seq_lens`` (upper bound is fine).
        num_seqs: ``B``.
        num_tokens: host-side ``query_start_loc[-1]`` if known. ``None`` means "unknown"; then a
            batch with ``max_query_len == 1`` is assumed to hold exactly one token per sequence.
    """

    slot_mapping: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    max_query_len: int
    max_seq_len: int
    num_seqs: int
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        expected = {
            "slot_mapping": (self.slot_mapping, 1, torch.int64),
            "query_start_loc": (self.query_start_loc, 1, torch.int32),
            "seq_lens": (self.seq_lens, 1, torch.int32),
            "block_tables": (self.block_tables, 2, torch.int32),
        }
        for name, (t, ndim, dtype) in expected.items():
            if t.dim() != ndim or t.dtype != dtype:
                raise ValueError(
                    f"AttentionMetadata.{name} must be a {ndim}-d {dtype} tensor, "
                    f"got shape {tuple(t.shape)} dtype {t.dtype}"
                )
        b = self.num_seqs
        if self.query_start_loc.shape[0] != b + 1:
            raise ValueError(
                f"query_start_loc has {self.query_start_loc.shape[0]} entries, expected num_seqs+1={b + 1}"
            )
        if self.seq_lens.shape[0] != b or self.block_tables.shape[0] != b:
            raise ValueError(
                f"seq_lens {tuple(self.seq_lens.shape)} and block_tables {tuple(self.block_tables.shape)} "
                f"must both have num_seqs={b} rows"
            )

    @property
    def is_uniform_decode(self) -> bool:
        """True when every sequence has exactly one query token (pure decode step)."""
        if self.max_query_len != 1:
            return False
        return self.num_tokens is None or self.num_tokens == self.num_seqs

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        *,
        max_blocks_per_seq: int | None = None,
        pad_tokens_to: int | None = None,
    ) -> "AttentionMetadata":
        """Build metadata from host lists; slot_mapping is derived from the block tables.

        Args:
            query_lens: new tokens per sequence (0 allowed, e.g. for padding sequences).
            seq_lens: total KV length per sequence, new tokens included (``>= query_len``).
            block_tables: per sequence, the physical blocks holding positions ``0..seq_len-1``.
            block_size: tokens per cache block.
            device: where the tensors live.
            max_blocks_per_seq: width of the padded block table (static shapes for CUDA graphs);
                defaults to the longest table.
            pad_tokens_to: pad ``slot_mapping`` with ``-1`` to this many tokens.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        num_seqs = len(query_lens)
        if len(seq_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError(
                f"query_lens ({num_seqs}), seq_lens ({len(seq_lens)}) and block_tables "
                f"({len(block_tables)}) must have the same length"
            )
        slots: list[int] = []
        for b, (q_len, s_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
            if q_len < 0 or s_len < q_len:
                raise ValueError(f"sequence {b}: need 0 <= query_len <= seq_len, got query_len={q_len} seq_len={s_len}")
            if len(table) < cdiv(s_len, block_size):
                raise ValueError(
                    f"sequence {b}: seq_len={s_len} needs {cdiv(s_len, block_size)} blocks of "
                    f"{block_size}, block table has {len(table)}"
                )
            if len(table) and min(table) < 0:
                raise ValueError(f"sequence {b}: negative block id in block table {list(table)}")
            pos = s_len - q_len
            while pos < s_len:  # one run of consecutive slots per block (a prefill has thousands of tokens)
                offset = pos % block_size
                n = min(block_size - offset, s_len - pos)
                first = table[pos // block_size] * block_size + offset
                slots.extend(range(first, first + n))
                pos += n
        width = max((len(t) for t in block_tables), default=0)
        width = max(width, 1) if max_blocks_per_seq is None else max_blocks_per_seq
        if any(len(t) > width for t in block_tables):
            raise ValueError(f"max_blocks_per_seq={width} is smaller than the longest block table")
        if pad_tokens_to is not None:
            if pad_tokens_to < len(slots):
                raise ValueError(f"pad_tokens_to={pad_tokens_to} is smaller than the {len(slots)} query tokens")
            slots += [PAD_SLOT] * (pad_tokens_to - len(slots))
        table_rows = [list(t) + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        return cls(
            slot_mapping=host_to_device(slots, torch.int64, device),
            query_start_loc=host_to_device(starts, torch.int32, device),
            seq_lens=host_to_device(list(seq_lens), torch.int32, device),
            block_tables=host_to_device(table_rows, torch.int32, device).view(num_seqs, width),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            num_seqs=num_seqs,
            num_tokens=starts[-1],
        )
