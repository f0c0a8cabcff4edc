"""The engine's decode fast paths give exactly what the general per-sequence / per-row paths give."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from infer.runtime.engine import sampler
from infer.runtime.engine.block_manager import BlockManager
from infer.runtime.engine.sampling import SamplingParams
from infer.runtime.engine.scheduler import Scheduler, SchedulerConfig
from infer.runtime.engine.sequence import Sequence

EOS = 99


class PerSequenceBlockManager(BlockManager):
    """Never grants the all-at-once append: the scheduler takes its per-sequence loop."""

    def may_append_all(self, seqs):
        return False


class PerEntryScheduler(Scheduler):
    """Postprocesses decode batches through the general per-entry loop."""

    def postprocess(self, batch, sampled_token_ids):
        return super().postprocess(dataclasses.replace(batch, is_prefill=True), sampled_token_ids)


def token_for(seq: Sequence) -> int:
    return EOS if seq.num_tokens % 7 == 0 else (sum(seq.token_ids) * 31 + seq.num_tokens) % 50


def workload(seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    prefixes = [list(range(100 * k, 100 * k + rand(0, 14))) for k in range(3)]
    seqs = []
    for i in range(30):
        prompt = prefixes[rand(0, 3)] + [rand(0, 50) for _ in range(rand(1, 10))]
        seqs.append(Sequence(i, prompt, SamplingParams(max_tokens=rand(1, 12), ignore_eos=rand(0, 2) == 1)))
    return seqs


def trace(sched_cls, bm_cls, seed: int) -> list:
    """Everything observable after every step of a preempting, prefix-caching workload."""
    bm = bm_cls(12, 4)
    sched = sched_cls(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    seqs = workload(seed)
    for seq in seqs:
        sched.add(seq)
    states = []
    while not sched.is_finished():
        batch = sched.schedule()
        entries = [(e.seq.request_id, e.start, e.num_new_tokens, e.sample) for e in batch.entries]
        tables = [list(e.seq.block_table) for e in batch.entries]
        done = sched.postprocess(batch, torch.tensor([token_for(e.seq) for e in batch.entries if e.sample]))
        states.append((batch.is_prefill, entries, tables, [s.request_id for s in done], list(bm.free),
                       dict(bm.hash_to_block), [(b.ref_count, b.hash) for b in bm.blocks]))
        assert len(states) < 2000
    states.append([(s.token_ids, s.finish_reason) for s in seqs])
    assert sched.num_preemptions > 0 and bm.stats.hit_blocks > 0
    assert {s.finish_reason for s in seqs} == {"stop", "length"}
    return states


@pytest.mark.parametrize("seed", range(4))
def test_decode_fast_paths_match_per_sequence_paths(seed):
    fast = trace(Scheduler, BlockManager, seed)
    assert fast == trace(PerEntryScheduler, PerSequenceBlockManager, seed)
    assert any(not prefill for prefill, *_ in fast[:-1])


def test_may_append_all_changes_nothing_when_blocks_are_short():
    bm = BlockManager(num_blocks=3, block_size=2)
    seqs = [Sequence(i, range(2)) for i in range(2)]
    for seq in seqs:
        bm.allocate(seq)
        seq.append_token(5)  # each now needs a second block; only one is free
    assert not bm.may_append_all(seqs)
    assert [s.block_table for s in seqs] == [[0], [1]] and bm.num_free_blocks == 1
    assert bm.may_append_all(seqs[:1]) and seqs[0].block_table == [0, 2]


def test_may_append_all_counts_pending_tokens():
    """A step scheduled ahead computes a token not yet appended: its block must exist already."""
    bm = BlockManager(num_blocks=4, block_size=2)
    seqs = [Sequence(i, range(2 + i)) for i in range(2)]  # 2 and 3 tokens
    for seq in seqs:
        bm.allocate(seq)
    assert bm.may_append_all(seqs) and [len(s.block_table) for s in seqs] == [1, 2]
    assert bm.may_append_all(seqs, num_pending=1) and [len(s.block_table) for s in seqs] == [2, 2]
    assert not bm.may_append_all(seqs, num_pending=3) and bm.num_free_blocks == 0


# ---------------------------------------------------------------- sampler

SHARED = [
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1e-7, top_k=3, top_p=0.5),
]


@pytest.mark.parametrize("sp", SHARED)
def test_shared_params_path_gives_the_per_row_tokens(sp):
    torch.manual_seed(1)
    logits = torch.randn(32, 500) * 3
    logits[0, [4, 9]] = 40.0  # a tie: greedy takes the lower id
    params = [dataclasses.replace(sp, max_tokens=1 + i) for i in range(32)]  # same sampling, other fields differ
    assert sampler._shared_params(params, [None] * 32) is params[0]
    for seed in range(3):
        torch.manual_seed(seed)
        fast = sampler.sample(logits, params)
        torch.manual_seed(seed)
        assert fast.tolist() == sampler._sample_per_row(logits.float(), params, None).tolist()
    if sp.greedy:
        assert fast[0] == 4


def test_mixed_params_or_generators_take_the_per_row_path():
    params = [SamplingParams(temperature=0.6)] * 3
    assert sampler._shared_params(params, None) is params[0]
    assert sampler._shared_params(params, [None, torch.Generator(), None]) is None
    assert sampler._shared_params(params[:2] + [SamplingParams(temperature=0.7)], None) is None
    assert sampler._shared_params(params[:2] + [SamplingParams(temperature=0.6, top_k=5)], None) is None
    logits = torch.randn(4, 50)
    logits[:, [3, 8]] = 30.0
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=0.5)] * 2
    out = sampler.sample(logits, mixed)
    assert out[0] == 3 and out[2] == 3  # greedy rows beside random rows: still the lowest tied id
