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
