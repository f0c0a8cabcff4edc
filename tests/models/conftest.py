"""Fixtures for model tests: tiny random HF checkpoints and a minimal paged-KV step runner."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import transformers

from infer.runtime.attention import Attention, AttentionMetadata, forward_context
from tiny_hf import CAUSAL_LM, make_hf_model  # noqa: F401  (re-exported to the model tests)

HF_CLASSES = CAUSAL_LM  # the kinds make_hf_model builds


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """``hf_checkpoint(kind, **config_overrides) -> (hf_model, folder)`` saved as safetensors."""
    counter = itertools.count()

    def save(kind: str, max_shard_size: str | None = None, **overrides):
        model = make_hf_model(kind, **overrides)
        folder = tmp_path / f"{kind}_{next(counter)}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        return model, folder

    return save


@torch.no_grad()
def _hf_logits(model: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """HF logits ``[L, V]`` for one sequence."""
    return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]


class PagedRunner:
    """Binds a fresh KV cache to every Attention layer and runs flat steps over several sequences."""

    def __init__(self, model: torch.nn.Module, block_size: int = 4, num_blocks: int = 64, seed: int = 0):
        dtype = next(model.parameters()).dtype
        for module in model.modules():
            if isinstance(module, Attention):
                shape = (2, num_blocks, block_size, module.num_kv_heads, module.head_dim)
                module.bind_kv_cache(torch.zeros(shape, dtype=dtype))
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.free_blocks = iter(order)  # non-contiguous block ids on purpose
        self.model = model
        self.block_size = block_size
        self.tables: list[list[int]] = []

    @torch.inference_mode()
    def step(self, seqs: list[list[int]], query_lens: list[int]) -> torch.Tensor:
        """Run the last ``query_lens[b]`` tokens of each ``seqs[b]``; returns logits ``[T, V]``."""
        while len(self.tables) < len(seqs):
            self.tables.append([])
        for seq, table in zip(seqs, self.tables):
            while len(table) * self.block_size < len(seq):
                table.append(next(self.free_blocks))
        ids = [t for seq, q in zip(seqs, query_lens) for t in seq[len(seq) - q:]]
        positions = [p for seq, q in zip(seqs, query_lens) for p in range(len(seq) - q, len(seq))]
        metadata = AttentionMetadata.build(
            query_lens=query_lens, seq_lens=[len(s) for s in seqs],
            block_tables=self.tables[: len(seqs)], block_size=self.block_size,
        )
        with forward_context(metadata):
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))  # [T, H]
        return self.model.compute_logits(hidden)  # [T, V]


@pytest.fixture
def hf_logits():
    """``hf_logits(hf_model, tokens) -> [L, V]``."""
    return _hf_logits


@pytest.fixture
def paged_runner():
    """``paged_runner(model, block_size=4, num_blocks=64) -> PagedRunner``."""
    return PagedRunner
