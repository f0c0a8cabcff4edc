"""The engine loop with async scheduling, on a model-free runner: the same outputs, and the same
batches sampled in the same order, as the synchronous loop."""
from __future__ import annotations

import pytest
import torch

from infer.runtime.engine.block_manager import BlockManager
from infer.runtime.engine.engine_loop import EngineLoop
from infer.runtime.engine.sampling import SamplingParams
from infer.runtime.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from infer.runtime.engine.sequence import Sequence
from infer.runtime.engine.step import LaunchedStep, PendingStep

EOS = 99


def token_for(seq: Sequence) -> int:
    """The fake model: the next token depends only on the sequence's tokens."""
    return EOS if seq.num_tokens % 7 == 0 else (sum(seq.token_ids) * 31 + seq.num_tokens) % 50


class FakeRunner:
    """Plays the device: ``launch`` writes KV (token ids) into a slot map in launch order, the
    stream order; reading it back checks that no step sees another sequence's (or a stale) KV.
    Sampling records the sampled rows: with a real sampler they decide the random draws."""

    def __init__(self, block_manager: BlockManager, fail_at_launch: int | None = None) -> None:
        self.bm = block_manager
        self.kv: dict[int, int] = {}
        self.sampled: list[list[tuple[int, int]]] = []  # per sampler call: (request id, position)
        self.dropped_rows = 0  # rows of steps run ahead whose sequence had stopped
        self.launches = 0
        self.fail_at_launch = fail_at_launch

    def supports_async(self, batch: ScheduledBatch) -> bool:
        return not batch.is_prefill

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        launched = self.launch(batch)
        return self._sample([e for e in launched.batch.entries if e.sample])

    def launch(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> LaunchedStep:
        self.launches += 1
        if self.launches == self.fail_at_launch:
            raise RuntimeError("device lost")
        bs = self.bm.block_size
        for i, entry in enumerate(batch.entries):
            seq = entry.seq
            ids = seq.token_ids[entry.start:entry.end]
            if batch.input_rows is not None:
                assert len(seq.token_ids) == entry.start and entry.num_new_tokens == 1
                ids = [int(input_tokens[batch.input_rows[i]])]
            for pos, token in zip(range(entry.start, entry.end), ids):
                block = seq.block_table[pos // bs]
                assert self.bm.blocks[block].ref_count == 1, "a step writes into a shared block"
                self.kv[block * bs + pos % bs] = token
            read = [self.kv.get(seq.block_table[p // bs] * bs + p % bs) for p in range(entry.end)]
            assert read == seq.token_ids[:entry.start] + ids, f"{seq!r} reads wrong KV"
        return LaunchedStep(batch)

    def sample_async(self, launched: LaunchedStep, rows: list[int] | None = None) -> PendingStep | None:
        entries = launched.batch.entries
        if rows is not None:
            self.dropped_rows += len(entries) - len(rows)
            entries = [entries[i] for i in rows]
        if not entries:
            return None
        return PendingStep.start(ScheduledBatch(entries, False), self._sample(entries))

    def _sample(self, entries) -> torch.Tensor:
        self.sampled.append([(e.seq.request_id, e.end) for e in entries])
        return torch.tensor([token_for(e.seq) for e in entries], dtype=torch.int64)


def workload(seed: int, num_seqs: int, max_tokens: int, eos: bool = True) -> list[Sequence]:
    """Prompts sharing prefixes, ``max_tokens`` in ``[1, max_tokens)``, half of them stopping at
    EOS (none when not ``eos``)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    prefixes = [list(range(100 * k, 100 * k + rand(0, 14))) for k in range(3)]
    seqs = []
    for i in range(num_seqs):
        prompt = prefixes[rand(0, 3)] + [rand(0, 50) for _ in range(rand(1, 10))]
        params = SamplingParams(max_tokens=rand(1, max_tokens), ignore_eos=not eos or i % 2 == 1)
        seqs.append(Sequence(i, prompt, params))
    return seqs


def run_workload(seed: int, async_scheduling: bool, num_blocks: int = 12, num_seqs: int = 30,
                 max_tokens: int = 12, eos: bool = True, **runner_kwargs):
    bm = BlockManager(num_blocks, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    runner = FakeRunner(bm, **runner_kwargs)
    seqs = workload(seed, num_seqs, max_tokens, eos)
    for seq in seqs:
        sched.add(seq)
    finished = list(EngineLoop(sched, runner, async_scheduling).run())
    assert sched.is_finished() and bm.num_free_blocks == num_blocks
    assert sorted(s.request_id for s in finished) == list(range(num_seqs))
    return seqs, sched, runner


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_blocks, num_seqs, max_tokens, eos", [
    (12, 30, 12, True), (1000, 30, 12, True), (1000, 6, 30, True), (1000, 30, 30, False)])
def test_async_loop_matches_sync_loop(seed, num_blocks, num_seqs, max_tokens, eos):
    """Preemption and prefix caching (12 blocks); a queue (30 requests, 6 at once); all requests
    running at once: mostly steps run ahead, sequences stopping in the middle; a queue of
    requests that only stop by length: steps run ahead with sequences waiting."""
    workload_args = (num_blocks, num_seqs, max_tokens, eos)
    sync_seqs, sync_sched, sync_runner = run_workload(seed, False, *workload_args)
    seqs, sched, runner = run_workload(seed, True, *workload_args)
    assert [(s.token_ids, s.finish_reason) for s in seqs] == [(s.token_ids, s.finish_reason) for s in sync_seqs]
    assert runner.sampled == sync_runner.sampled  # same batches, same order: same random draws
    assert sched.num_ahead_steps > 0 and sync_sched.num_ahead_steps == 0
    assert {s.finish_reason for s in seqs} == ({"stop", "length"} if eos else {"length"})
    if not eos:  # ahead with a full batch and a queue, until a sequence's length frees a slot
        assert sched.num_ahead_steps > len(runner.sampled) // 3
    if num_blocks == 12:
        assert sched.num_preemptions > 0 and sched.block_manager.stats.hit_blocks > 0
    if num_seqs == 6:  # every decode step but the first after a prefill runs ahead
        assert runner.dropped_rows > 0 and sched.num_ahead_steps > len(runner.sampled) // 2


def test_schedule_ahead_skips_length_limits_and_holds_back():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    seqs = [Sequence(i, range(3), SamplingParams(max_tokens=n)) for i, n in enumerate([5, 2, 5])]
    for seq in seqs:
        sched.add(seq)
    sched.postprocess(sched.schedule(), [1, 1, 1])  # prefill: each holds 4 tokens in 1 block
    prev = sched.schedule()
    ahead = sched.schedule_ahead(prev)
    # seq 1 reaches max_tokens=2 with its pending token; the others compute it at position 4
    assert [e.seq.request_id for e in ahead.entries] == [0, 2] and ahead.input_rows == [0, 2]
    assert [(e.start, e.num_new_tokens, e.sample) for e in ahead.entries] == [(4, 1, True)] * 2
    assert [len(s.block_table) for s in seqs] == [2, 1, 2]  # a block for position 4, before it is known
    sched.postprocess(prev, [EOS, 2, 3])
    assert [s.finish_reason for s in seqs] == ["stop", "length", None]
    assert sched.running == [seqs[2]]
    sched.add(Sequence(3, range(3)))
    assert sched.schedule_ahead(ScheduledBatch([e for e in ahead.entries if e.seq is seqs[2]], False)) is None
    assert sched.num_ahead_steps == 1


def test_schedule_ahead_with_a_queue_only_while_no_slot_can_free_up():
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    only_length = SamplingParams(max_tokens=3, ignore_eos=True)
    seqs = [Sequence(i, range(3), sp) for i, sp in enumerate([only_length, only_length, SamplingParams()])]
    for seq in seqs:
        sched.add(seq)
    sched.postprocess(sched.schedule(), [1, 1])  # 0 and 1 run, 2 waits
    prev = sched.schedule()
    ahead = sched.schedule_ahead(prev)  # the batch stays full: 2 cannot be admitted next step
    assert ahead is not None and [e.seq for e in ahead.entries] == seqs[:2]
    sched.postprocess(prev, [5, 6])
    prev = ScheduledBatch(ahead.entries, False)
    assert sched.schedule_ahead(prev) is None  # both reach max_tokens: 2 is admitted next step
    longer = SamplingParams(max_tokens=9, ignore_eos=True)
    seqs[0].params, seqs[1].params = longer, SamplingParams(max_tokens=9, stop_token_ids=(7,))
    assert sched.schedule_ahead(prev) is None  # 1 may stop on its token: a slot may free up
    seqs[1].params = longer
    assert sched.schedule_ahead(prev) is not None


def test_schedule_ahead_changes_nothing_when_blocks_run_short():
    bm = BlockManager(3, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    for i in range(2):
        sched.add(Sequence(i, range(3), SamplingParams(max_tokens=9)))
    sched.postprocess(sched.schedule(), [1, 1])
    prev = sched.schedule()
    tables = [list(s.block_table) for s in sched.running]
    assert sched.schedule_ahead(prev) is None  # both need a second block for position 4; 1 is free
    assert [s.block_table for s in sched.running] == tables and bm.num_free_blocks == 1


def test_an_exception_mid_run_leaves_the_engine_clean():
    with pytest.raises(RuntimeError, match="device lost"):
        run_workload(0, True, fail_at_launch=9)
    bm = BlockManager(12, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, max_model_len=40), bm, [EOS])
    runner = FakeRunner(bm, fail_at_launch=9)
    for seq in workload(0, 30, 12):
        sched.add(seq)
    with pytest.raises(RuntimeError, match="device lost"):
        list(EngineLoop(sched, runner, True).run())
    assert sched.is_finished() and bm.num_free_blocks == 12
    seq = Sequence("again", range(5), SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add(seq)
    assert list(EngineLoop(sched, runner, True).run()) == [seq] and seq.num_output_tokens == 4
