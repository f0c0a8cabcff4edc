"""Engine core without a model: sampling params, block manager, scheduler, sampler."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from infer.runtime.engine.block_manager import BlockManager
from infer.runtime.engine.sampler import sample
from infer.runtime.engine.sampling import SamplingParams
from infer.runtime.engine.scheduler import Scheduler, SchedulerConfig
from infer.runtime.engine.sequence import Sequence, SequenceStatus

EOS = 99


# ---------------------------------------------------------------- sampling params / sequence

@pytest.mark.parametrize("kwargs, bad", [
    ({"max_tokens": 0}, 0), ({"max_tokens": -3}, -3), ({"temperature": -0.5}, -0.5),
    ({"temperature": float("inf")}, float("inf")), ({"top_p": 0.0}, 0.0), ({"top_p": 1.5}, 1.5),
    ({"top_k": -2}, -2), ({"stop_token_ids": (3, -1)}, -1), ({"seed": 1.5}, 1.5),
])
def test_sampling_params_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_frozen():
    params = SamplingParams(temperature=0, stop_token_ids=[5, 6], top_k=0)
    assert params.greedy and params.stop_token_ids == (5, 6)
    assert not SamplingParams().greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0


def test_sequence_basics():
    with pytest.raises(ValueError, match="at least 1 token"):
        Sequence("empty", [])
    seq = Sequence("a", [1, 2, 3], SamplingParams(seed=3))
    seq.append_token(7)
    assert (seq.prompt_token_ids, seq.output_token_ids, seq.num_tokens) == ([1, 2, 3], [7], 4)
    assert seq.generator is not None and seq.status is SequenceStatus.WAITING


# ---------------------------------------------------------------- block manager

def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Allocate, then pretend the model computed every token but the last, as after a prefill."""
    bm.allocate(seq)
    start, seq.num_computed_tokens = seq.num_computed_tokens, seq.num_tokens - 1
    bm.commit(seq, start)
    return seq


def test_block_manager_allocates_appends_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence(0, range(8))
    assert bm.can_allocate(seq) and bm.allocate(seq) == 0
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    seq.append_token(8)  # position 8 starts a third block
    assert bm.can_append(seq)
    bm.may_append(seq)
    seq.append_token(9)
    bm.may_append(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4


def test_prefix_cache_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, Sequence("a", range(10)))
    prefix = a.block_table[:2]
    b = Sequence("b", list(range(8)) + [50, 51, 52])
    assert bm.allocate(b) == 8 and b.num_computed_tokens == 8 == b.num_cached_tokens
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2, 1]
    assert (bm.stats.hit_blocks, bm.stats.queried_blocks) == (2, 4)  # a: 2 misses, b: 2 hits
    c = Sequence("c", range(8))  # the last token's block is never taken from the cache
    assert bm.allocate(c) == 4 and c.block_table[1] != a.block_table[1]
    for seq in (a, b, c):
        bm.deallocate(seq)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)
    d = Sequence("d", range(9))  # freed blocks keep their content
    assert bm.can_allocate(d) and bm.allocate(d) == 8 and d.block_table[:2] == prefix


def test_freed_block_reused_loses_its_hash():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = computed(bm, Sequence("a", range(9)))
    table = list(a.block_table)
    bm.deallocate(a)  # tail block is freed first, so it is overwritten first
    one = Sequence("one", [70])
    bm.allocate(one)
    assert one.block_table == [table[2]]
    bm.deallocate(one)
    assert bm.allocate(Sequence("again", range(9))) == 8  # prefix blocks survived
    bm2 = BlockManager(num_blocks=3, block_size=4)
    a = computed(bm2, Sequence("a", range(9)))
    table = list(a.block_table)
    assert len(bm2.hash_to_block) == 2
    bm2.deallocate(a)
    other = Sequence("other", range(100, 109))
    bm2.allocate(other)  # takes every free block, the cached ones included
    assert sorted(other.block_table) == sorted(table) and not bm2.hash_to_block
    assert all(bm2.blocks[i].hash is None for i in table)
    bm2.deallocate(other)
    assert bm2.allocate(Sequence("again", range(9))) == 0


def test_commit_refuses_to_hash_a_block_before_its_tokens_are_known():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence(0, range(3))
    bm.allocate(seq)
    seq.num_computed_tokens = 4  # as if the commit came before the 4th token was appended
    with pytest.raises(AssertionError, match="before its tokens are known"):
        bm.commit(seq, 0)
    seq.append_token(3)
    bm.commit(seq, 0)
    assert bm.blocks[seq.block_table[0]].token_ids == (0, 1, 2, 3)


def test_can_allocate_counts_cached_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = computed(bm, Sequence("a", range(9)))
    bm.deallocate(a)
    holder = Sequence("holder", [77])
    bm.allocate(holder)  # 2 free blocks left, both cached prefix blocks of "a"
    assert bm.can_allocate(Sequence("hit", range(9))) is False  # needs 2 cached + 1 fresh
    assert bm.can_allocate(Sequence("hit", range(8))) is True


# ---------------------------------------------------------------- scheduler

def next_token(seq: Sequence) -> int:
    """A deterministic stand-in for the model: depends only on the sequence's tokens."""
    return (sum(seq.token_ids) * 31 + seq.num_tokens) % 50


def make_scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    cfg = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 128, **cfg}
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size), eos_token_ids=[EOS])


def step(sched: Scheduler, token_fn=next_token):
    batch = sched.schedule()
    tokens = [token_fn(e.seq) for e in batch.entries if e.sample]
    return batch, sched.postprocess(batch, tokens)


def run_all(sched: Scheduler, seqs, token_fn=next_token, max_steps=500):
    for seq in seqs:
        sched.add(seq)
    batches = []
    while not sched.is_finished() and len(batches) < max_steps:
        batches.append(step(sched, token_fn)[0])
    assert sched.is_finished()
    return batches


def params(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def test_continuous_batching_order():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [Sequence(i, range(5), params(n)) for i, n in enumerate([2, 4, 3])]
    batches = run_all(sched, seqs)
    shape = [(b.is_prefill, [e.seq.request_id for e in b.entries]) for b in batches]
    assert shape[:4] == [(True, [0, 1]), (False, [0, 1]), (True, [2]), (False, [1, 2])]
    assert [s.num_output_tokens for s in seqs] == [2, 4, 3]
    assert all(s.finish_reason == "length" and not s.block_table for s in seqs)
    assert sched.block_manager.num_free_blocks == 64


def test_chunked_prefill_splits_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    long, short = Sequence("long", range(21), params(2)), Sequence("short", range(3), params(2))
    batches = run_all(sched, [long, short])
    chunks = [e for b in batches for e in b.entries if e.seq is long and b.is_prefill]
    assert [e.num_new_tokens for e in chunks] == [8, 8, 5]
    assert [e.start for e in chunks] == [0, 8, 16] and [e.sample for e in chunks] == [False, False, True]
    assert all(b.num_tokens <= 8 for b in batches)
    assert long.num_output_tokens == 2 and short.num_output_tokens == 2


def test_chunked_prefill_off_needs_a_big_budget():
    with pytest.raises(ValueError, match="max_model_len=128"):
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=128, enable_chunked_prefill=False)
    sched = make_scheduler(max_num_batched_tokens=128, enable_chunked_prefill=False)
    batches = run_all(sched, [Sequence(0, range(100), params(2)), Sequence(1, range(40), params(2))])
    assert [e.seq.request_id for e in batches[0].entries] == [0]  # 100 + 40 > 128: no split
    assert all(e.sample for b in batches for e in b.entries)


def test_preemption_frees_newest_and_resumes_with_same_output():
    reference = [Sequence(i, range(10 * i, 10 * i + 7), params(6)) for i in range(2)]
    run_all(make_scheduler(num_blocks=64), reference)
    sched = make_scheduler(num_blocks=4)  # 2 sequences x 2 blocks fill the cache
    seqs = [Sequence(i, range(10 * i, 10 * i + 7), params(6)) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    step(sched)
    step(sched)  # decode: both now need a third block
    batch, _ = step(sched)
    assert [e.seq.request_id for e in batch.entries] == [0] and sched.num_preemptions == 1
    victim = seqs[1]
    assert victim.status is SequenceStatus.WAITING and sched.waiting[0] is victim
    assert victim.num_computed_tokens == 0 and victim.num_output_tokens == 2 and not victim.block_table
    batches = run_all(sched, [])
    resumed = next(e for b in batches for e in b.entries if e.seq is victim)
    assert resumed.start + resumed.num_new_tokens == 9  # prompt 7 + 2 generated, recomputed
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in reference]


class CacheChecker:
    """A fake model that writes token ids into a fake KV cache and checks every read."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.slots = sched, {}

    def slot(self, seq: Sequence, pos: int) -> int:
        bs = self.sched.block_manager.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def step(self) -> None:
        bm = self.sched.block_manager
        batch = self.sched.schedule()
        for e in batch.entries:
            for pos in range(e.start, e.end):
                assert bm.blocks[e.seq.block_table[pos // bm.block_size]].ref_count == 1, "write to a shared block"
                self.slots[self.slot(e.seq, pos)] = e.seq.token_ids[pos]
            assert [self.slots.get(self.slot(e.seq, p)) for p in range(e.end)] == e.seq.token_ids[:e.end]
        self.sched.postprocess(batch, [next_token(e.seq) for e in batch.entries if e.sample])
        refs = [0] * bm.num_blocks
        for seq in self.sched.running:
            for b in seq.block_table:
                refs[b] += 1
        assert refs == [blk.ref_count for blk in bm.blocks]
        assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_matches_unconstrained_run(seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    prefixes = [list(range(100 * k, 100 * k + rand(0, 14))) for k in range(3)]
    specs = [(prefixes[rand(0, 3)] + [rand(0, 50) for _ in range(rand(1, 10))], rand(1, 12)) for _ in range(30)]
    reference = [Sequence(i, p, params(n)) for i, (p, n) in enumerate(specs)]
    run_all(make_scheduler(num_blocks=1000), reference)
    sched = make_scheduler(num_blocks=12, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=40)
    seqs = [Sequence(i, p, params(n)) for i, (p, n) in enumerate(specs)]
    for seq in seqs:
        sched.add(seq)
    checker = CacheChecker(sched)
    for _ in range(1000):
        if sched.is_finished():
            break
        checker.step()
    assert sched.is_finished() and sched.num_preemptions > 0 and sched.block_manager.stats.hit_blocks > 0
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in reference]


def test_requests_that_never_fit_fail_alone():
    sched = make_scheduler(num_blocks=4, max_model_len=20)
    too_long, too_big = Sequence("long", range(21), params(2)), Sequence("big", range(17), params(2))
    ok = Sequence("ok", range(5), params(3))
    for seq in (too_long, too_big, ok):
        sched.add(seq)
    batch, _ = step(sched)
    assert batch.finished == [too_long, too_big] and [e.seq for e in batch.entries] == [ok]
    assert "max_model_len=20" in too_long.error and "21" in too_long.error
    assert "only 4 exist" in too_big.error and too_big.finish_reason == "error"
    run_all(sched, [])
    assert ok.finish_reason == "length" and ok.num_output_tokens == 3


def test_sequence_outgrowing_the_cache_fails_with_its_output():
    sched = make_scheduler(num_blocks=2, max_num_seqs=1)
    seq = Sequence(0, range(6), params(10))
    run_all(sched, [seq])
    assert seq.finish_reason == "error" and seq.num_output_tokens == 3 and "only 2 exist" in seq.error
    assert sched.block_manager.num_free_blocks == 2


@pytest.mark.parametrize("sp, tokens, reason, n_out", [
    (SamplingParams(max_tokens=10), [3, EOS, 4], "stop", 2),
    (SamplingParams(max_tokens=3, ignore_eos=True), [EOS] * 5, "length", 3),
    (SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(7,)), [EOS, 7, 1], "stop", 2),
    (SamplingParams(max_tokens=100, ignore_eos=True), [1] * 200, "length", 12),  # max_model_len
])
def test_finish_conditions(sp, tokens, reason, n_out):
    sched = make_scheduler(max_model_len=16)
    seq = Sequence(0, range(4), sp)
    it = iter(tokens)
    run_all(sched, [seq], token_fn=lambda s: next(it))
    assert (seq.finish_reason, seq.num_output_tokens) == (reason, n_out)
    assert seq.output_token_ids == tokens[:n_out]


def test_postprocess_checks_token_count():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(Sequence(0, range(20), params(2)))
    sched.add(Sequence(1, range(3), params(2)))
    batch = sched.schedule()
    assert [e.sample for e in batch.entries] == [False]
    with pytest.raises(ValueError, match="got 2 sampled token ids"):
        sched.postprocess(batch, [1, 2])
    sched.postprocess(batch, torch.tensor([5]))  # one id per entry is accepted too
    assert sched.running[0].num_computed_tokens == 8


# ---------------------------------------------------------------- sampler

def test_greedy_is_argmax_with_lowest_index_ties():
    logits = torch.randn(5, 100)
    logits[0, [3, 7]] = 50.0
    out = sample(logits, [SamplingParams(temperature=0)] * 5)
    assert out.tolist() == logits.argmax(-1).tolist() and out[0] == 3


@pytest.mark.parametrize("sp", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6, temperature=2.0)])
def test_top_k_1_and_tiny_top_p_are_greedy(sp):
    logits = torch.randn(16, 1000)
    assert sample(logits, [sp] * 16).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seeded, other", [
    (SamplingParams(temperature=1.5, top_k=50, top_p=0.9, seed=7), SamplingParams(temperature=0.7)),
    (SamplingParams(temperature=0.8, seed=7), SamplingParams(top_k=5)),
])
def test_seeded_sampling_is_reproducible_and_batch_independent(seeded, other):
    torch.manual_seed(0)
    rows = torch.randn(4, 300)

    def draws(batch_rows, index, steps=5):
        gens = [torch.Generator().manual_seed(7) if i == index else None for i in range(len(batch_rows))]
        ps = [seeded if i == index else other for i in range(len(batch_rows))]
        return [sample(batch_rows, ps, gens)[index].item() for _ in range(steps)]

    alone = draws(rows[:1], 0)
    assert draws(rows[:1], 0) == alone
    assert draws(torch.cat([rows[1:], rows[:1]]), 3) == alone
    assert len(set(draws(rows[:1], 0, steps=40))) > 1


@pytest.mark.parametrize("sp, expected", [
    (SamplingParams(), [0.1, 0.2, 0.3, 0.4]),
    (SamplingParams(top_k=2), [0, 0, 3 / 7, 4 / 7]),
    (SamplingParams(top_p=0.5), [0, 0, 3 / 7, 4 / 7]),
    (SamplingParams(top_p=0.3), [0, 0, 0, 1]),
    (SamplingParams(temperature=0.5), [1 / 30, 4 / 30, 9 / 30, 16 / 30]),
])
def test_sampling_distribution(sp, expected):
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(n, 4)
    freq = torch.bincount(sample(logits, [sp] * n), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float32), atol=0.015, rtol=0)


def test_sampler_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="per logits row"):
        sample(torch.randn(3, 10), [SamplingParams()] * 2)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sample(torch.randn(10), [SamplingParams()])
