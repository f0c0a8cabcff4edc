"""KV-cache block allocation with prefix caching over full blocks.

A full block is identified by the hash of ``(hash of the previous block, its token ids)``, so
two sequences that share a prefix of full blocks share the same physical blocks (reference
counted). A block is registered in the cache only once its KV is computed (:meth:`commit`).
Freed blocks keep their hash and stay reusable until they are handed out again; the free list
is ordered oldest-freed first, and a sequence frees its tail blocks first, so the prefix blocks
that are most likely to be shared are the last to be overwritten.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..attention.metadata import cdiv
from .sequence import Sequence

NO_HASH = -1  # the "previous block hash" of a sequence's first block


@dataclass(slots=True)
class Block:
    """One physical KV block: its reference count and, once full and computed, its content key."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters of prefix-cache lookups, in blocks and in tokens."""

    queried_blocks: int = 0
    hit_blocks: int = 0
    hit_tokens: int = 0


class BlockManager:
    """Hands out KV blocks of ``block_size`` token slots to sequences.

    Usage by the scheduler: ``can_allocate``/``allocate`` when a sequence is admitted (blocks for
    all of its current tokens, reusing cached prefix blocks), ``can_append``/``may_append`` before
    each decode step, ``commit`` after each step, ``deallocate`` when it finishes or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evictable)."""
        return len(self.free)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_hash(self, prev_hash: int, token_ids: tuple[int, ...]) -> int:
        """Content key of a full block that follows a block with hash ``prev_hash``."""
        return hash((prev_hash, token_ids))

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks matching the sequence's leading full blocks.

        Only blocks that end before the last token are looked up, so at least one token is
        always left to compute and no step ever writes into a shared block.
        """
        hits: list[int] = []
        prev = NO_HASH
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = self.block_hash(prev, tokens)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether :meth:`allocate` would succeed for ``seq`` now."""
        hits = self._cached_prefix(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.num_blocks_needed(seq.num_tokens) - len(hits)
        return fresh + reclaimed <= len(self.free)

    def allocate(self, seq: Sequence) -> int:
        """Give ``seq`` blocks for all of its tokens, reusing cached prefix blocks.

        Sets ``seq.block_table``, ``seq.num_computed_tokens`` and ``seq.num_cached_tokens`` to the
        number of tokens found in the cache, and returns that number.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} already holds {len(seq.block_table)} blocks")
        if not self.can_allocate(seq):
            raise ValueError(f"not enough free KV blocks for sequence {seq.request_id!r} "
                             f"({seq.num_tokens} tokens, {len(self.free)} free blocks)")
        hits = self._cached_prefix(seq)
        self.stats.queried_blocks += (seq.num_tokens - 1) // self.block_size
        self.stats.hit_blocks += len(hits)
        for block_id in hits:
            self._ref(block_id)
        fresh = [self._take_free() for _ in range(self.num_blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        cached = len(hits) * self.block_size
        self.stats.hit_tokens += cached
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        return cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for the sequence's next decode step are available."""
        missing = self.num_blocks_needed(seq.num_tokens) - len(seq.block_table)
        return missing <= len(self.free)

    def may_append(self, seq: Sequence) -> None:
        """Add a block when the token to compute next starts a new one."""
        missing = self.num_blocks_needed(seq.num_tokens) - len(seq.block_table)
        if missing > len(self.free):
            raise ValueError(f"sequence {seq.request_id!r} needs {missing} more blocks, {len(self.free)} free")
        seq.block_table.extend(self._take_free() for _ in range(missing))

    def may_append_all(self, seqs: list[Sequence], num_pending: int = 0) -> bool:
        """:meth:`may_append` for every sequence when the blocks suffice for all of them at once;
        otherwise change nothing and return False (the caller then decides whom to preempt).

        ``num_pending``: tokens each sequence holds beyond ``seq.token_ids`` (sampled on the
        device, not known yet): 1 for a step scheduled ahead.
        """
        bs = self.block_size
        growing = [seq for seq in seqs if len(seq.token_ids) + num_pending > len(seq.block_table) * bs]
        missing = [self.num_blocks_needed(len(seq.token_ids) + num_pending) - len(seq.block_table)
                   for seq in growing]
        if sum(missing) > len(self.free):
            return False
        for seq, n in zip(growing, missing):
            seq.block_table.extend(self._take_free() for _ in range(n))
        return True

    def commit_decode(self, seqs: list[Sequence]) -> None:
        """:meth:`commit` after a decode step computed one token of every sequence."""
        bs = self.block_size
        for seq in seqs:
            if seq.num_computed_tokens % bs == 0:  # the step filled a block
                self.commit(seq, seq.num_computed_tokens - 1)

    def commit(self, seq: Sequence, start: int) -> None:
        """Register the blocks filled by a step that computed positions ``start..num_computed``.

        Call after ``seq.num_computed_tokens`` was advanced; every block before ``start``'s block
        must already be full and registered (true for the scheduler's order of calls). A block's
        hash covers its token ids, so all of them must be in ``seq.token_ids``: with async
        scheduling a step's input id is sampled on the device, and the step is committed only
        after that id was appended (by the previous step's postprocess).
        """
        bs = self.block_size
        for i in range(start // bs, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else NO_HASH
            assert prev is not None, "blocks must be committed in order"
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            assert len(block.token_ids) == bs, f"block {i} of {seq!r} is hashed before its tokens are known"
            block.hash = self.block_hash(prev, block.token_ids)
            self.hash_to_block[block.hash] = block.block_id  # newest copy: it is in use

    def deallocate(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first) and reset its KV progress."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        """Pop the oldest free block, dropping the cached content it held."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id
