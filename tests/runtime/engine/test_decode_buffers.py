"""Static decode buffers for full CUDA graphs hold the same step as freshly built metadata."""
import pytest
import torch

from infer.runtime.attention import AttentionMetadata
from infer.runtime.engine.decode_buffers import DecodeBuffers


@pytest.mark.parametrize("block_size", [4, 16])
def test_fill_matches_built_metadata_and_pads_dummy_rows(block_size):
    tables = [[2, 7, 5], [4], [9, 1]]
    positions = [2 * block_size + 1, 3, block_size]  # the new token of each sequence
    ids = [11, 12, 13]
    buffers = DecodeBuffers.allocate(8, 4, 4 * block_size, "cpu")
    before = [t.data_ptr() for t in (buffers.input_ids, buffers.metadata.slot_mapping, buffers.metadata.seq_lens)]
    buffers.fill(ids, positions, tables, block_size)
    built = AttentionMetadata.build([1] * 3, [p + 1 for p in positions], tables, block_size, "cpu",
                                    max_blocks_per_seq=4)
    md = buffers.metadata
    torch.testing.assert_close(md.slot_mapping[:3], built.slot_mapping)
    torch.testing.assert_close(md.seq_lens[:3], built.seq_lens)
    torch.testing.assert_close(md.block_tables[:3], built.block_tables)
    assert md.slot_mapping[3:].eq(-1).all() and md.seq_lens[3:].eq(0).all()  # dummy rows read/write nothing
    assert buffers.input_ids.tolist() == ids + [0] * 5 and buffers.positions[:3].tolist() == positions
    assert md.is_uniform_decode and md.num_seqs == 8
    after = [t.data_ptr() for t in (buffers.input_ids, buffers.metadata.slot_mapping, buffers.metadata.seq_lens)]
    assert after == before  # written in place: a captured graph keeps reading them
    buffers.clear()
    assert md.slot_mapping.eq(-1).all() and md.seq_lens.eq(0).all()


def built_step(tables, positions, size, block_size, width):
    """What a fresh fill of ``size`` rows must hold: metadata built from scratch, dummy rows after."""
    n = len(tables)
    built = AttentionMetadata.build([1] * n, [p + 1 for p in positions], tables, block_size, "cpu",
                                    max_blocks_per_seq=width)
    pad = size - n
    return (torch.cat([built.slot_mapping, torch.full((pad,), -1)]),
            torch.cat([built.seq_lens, torch.zeros(pad, dtype=torch.int32)]),
            torch.cat([built.block_tables, torch.zeros(pad, width, dtype=torch.int32)]))


@pytest.mark.parametrize("seed", range(3))
def test_refill_after_growth_shifts_and_replacements_matches_fresh_metadata(seed):
    """Staged block-table rows are reused across steps: every change of the batch must show up."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda hi: int(torch.randint(hi, (1,), generator=gen))  # noqa: E731
    block_size, width, size = 4, 6, 8
    next_block = iter(range(10**6))
    new_table = lambda: [next(next_block) for _ in range(1 + rand(3))]  # noqa: E731
    batch = [new_table() for _ in range(size)]
    buffers = DecodeBuffers.allocate(size, width, width * block_size, "cpu")
    for step in range(60):
        event = rand(5)
        if event == 0 and len(batch) > 1:  # a sequence finishes: later rows shift up
            batch.pop(rand(len(batch)))
        elif event == 1 and len(batch) < size:  # a sequence joins
            batch.insert(rand(len(batch) + 1), new_table())
        elif event == 2:  # preempted and readmitted: a new list
            batch[rand(len(batch))] = new_table()
        for table in batch:  # decode: tables grow in place
            if len(table) < width and rand(3) == 0:
                table.append(next(next_block))
        if step % 20 == 19:
            buffers.clear()
        positions = [len(t) * block_size - 1 - rand(block_size) for t in batch]
        ids = [rand(1000) for _ in batch]
        buffers.fill(ids, positions, batch, block_size)
        slots, seq_lens, tables = built_step(batch, positions, size, block_size, width)
        md = buffers.metadata
        torch.testing.assert_close(md.slot_mapping, slots)
        torch.testing.assert_close(md.seq_lens, seq_lens)
        torch.testing.assert_close(md.block_tables, tables)
        assert buffers.input_ids.tolist() == ids + [0] * (size - len(batch))
        assert buffers.positions.tolist() == positions + [0] * (size - len(batch))


def test_fill_rejects_a_position_past_the_block_table():
    buffers = DecodeBuffers.allocate(4, 4, 16, "cpu")
    tables = [[0], [1, 2]]
    with pytest.raises(ValueError, match="position 8 is past its block table of 2 blocks"):
        buffers.fill([1, 2], [3, 8], tables, 4)
    with pytest.raises(ValueError, match="exceeds max_blocks_per_seq=4"):
        buffers.fill([1], [3], [[0, 1, 2, 3, 4]], 4)
    with pytest.raises(ValueError, match="at most 4 ids"):
        buffers.fill([1] * 5, [0] * 5, [[0]] * 5, 4)
    positions = [3, 5]
    buffers.fill([1, 2], positions, tables, 4)  # the same lists: nothing stale from the rejected fill
    slots, seq_lens, block_tables = built_step(tables, positions, 4, 4, 4)
    torch.testing.assert_close(buffers.metadata.slot_mapping, slots)
    torch.testing.assert_close(buffers.metadata.block_tables, block_tables)


def test_fill_without_ids_writes_the_rest_of_the_step():
    """A step scheduled ahead: its ids are on the device only, the caller writes them after."""
    block_size, tables, positions = 4, [[3, 1], [0], [2]], [5, 2, 0]
    buffers = DecodeBuffers.allocate(4, 4, 16, "cpu")
    buffers.fill([7, 8, 9, 10], [1, 1, 1, 1], [[0]] * 4, block_size)
    buffers.fill(None, positions, tables, block_size)
    buffers.input_ids[:3].copy_(torch.tensor([21, 22, 23]))
    slots, seq_lens, block_tables = built_step(tables, positions, 4, block_size, 4)
    md = buffers.metadata
    torch.testing.assert_close(md.slot_mapping, slots)
    torch.testing.assert_close(md.seq_lens, seq_lens)
    torch.testing.assert_close(md.block_tables, block_tables)
    assert buffers.input_ids.tolist() == [21, 22, 23, 0] and buffers.positions.tolist() == positions + [0]
    with pytest.raises(ValueError, match="got 2 ids, 3 positions"):
        buffers.fill([1, 2], positions, tables, block_size)
