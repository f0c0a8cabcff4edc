"""Async scheduling gives exactly the synchronous engine's outputs, on tiny random checkpoints.

On CPU the async path runs like on CUDA with full decode graphs, minus the graphs: the runner is
given capture sizes and full-graph decode buffers (as in test_padded_decode_batches_give_the_same_output),
and each decode step is scheduled and launched before the previous one is postprocessed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infer import LLM, RequestOutput, SamplingParams
from tiny_hf import CAUSAL_LM_TINY as TINY, make_hf_model, word_tokenizer

PROMPTS = [[17, 3, 99, 45, 200], [5, 81, 9, 230, 14, 66, 7, 150, 42, 8, 31],
           [(7 * i + 11) % 250 + 3 for i in range(23)], [40, 41, 42], [250, 3, 8, 100, 7, 9, 19]]
SMALL_KV = 1 << 20
BLOCK_BYTES = 2 * TINY["num_hidden_layers"] * 4 * TINY["num_key_value_heads"] * TINY["head_dim"] * 4  # 4 tokens


def save_checkpoint(path: Path, **overrides) -> Path:
    """A tiny random llama checkpoint with a word-level tokenizer."""
    model = make_hf_model("llama", 0, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, model.config.vocab_size)]
    word_tokenizer(words, None).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny_async") / "llama")


def engine(folder: Path, monkeypatch, async_scheduling: bool, **kwargs) -> LLM:
    """A CPU engine whose decode steps take the full-graph path: static buffers padded to 1, 2, 4, 8."""
    kwargs.setdefault("cpu_kv_cache_bytes", SMALL_KV)
    kwargs.setdefault("block_size", 4)
    llm = LLM(folder, compile=False, device="cpu", async_scheduling=async_scheduling, **kwargs)
    monkeypatch.setattr(llm.runner.graphs, "sizes", (1, 2, 4, 8))
    monkeypatch.setattr(llm.runner.graphs, "mode", "full")
    return llm


def results(outputs: list[RequestOutput]) -> list[tuple[list[int], str, str | None]]:
    return [(o.token_ids, o.finish_reason, o.error) for o in outputs]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def first_new(tokens: list[int], start: int) -> int:
    """The first token at index ``>= start`` that does not occur before it (else the last one)."""
    return next((t for i, t in enumerate(tokens) if i >= start and t not in tokens[:i]), tokens[-1])


def stopping_params(reference: list[list[int]]) -> list[SamplingParams]:
    """Greedy params that stop prompts 0, 2 and 4 on a token of their reference output, in the
    middle of the batch and at different steps; prompts 1 and 3 run to different max_tokens."""
    stops = {i: first_new(reference[i], k) for i, k in ((0, 4), (2, 5), (4, 2))}
    return [greedy(12, stop_token_ids=(stops[0],)), greedy(9), greedy(12, stop_token_ids=(stops[2],)),
            greedy(12), greedy(12, stop_token_ids=(stops[4],))]


def truncated(reference: list[list[int]], params: list[SamplingParams], eos: frozenset[int]) -> list[list[int]]:
    """Greedy outputs as the finish rules cut them: at max_tokens or the first stop or eos id."""
    outs = []
    for tokens, sp in zip(reference, params):
        stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos)
        ends = [i + 1 for i, t in enumerate(tokens[:sp.max_tokens]) if t in stop]
        outs.append(tokens[:ends[0] if ends else sp.max_tokens])
    return outs


def compare(async_llm: LLM, sync_llm: LLM, *calls, seed: int | None = None) -> list[list[RequestOutput]]:
    """Run the same ``generate`` calls on both engines (reseeding the global RNG before each when
    ``seed`` is given); check the outputs are equal and that steps were run ahead."""
    outs = []
    for args in calls:
        pair = []
        for llm in (async_llm, sync_llm):
            if seed is not None:
                torch.manual_seed(seed)
            pair.append(llm.generate(*args, use_tqdm=False))
        assert results(pair[0]) == results(pair[1])
        assert [o.text for o in pair[0]] == [o.text for o in pair[1]]
        outs.append(pair[0])
    assert async_llm.scheduler.num_ahead_steps > 0 and sync_llm.scheduler.num_ahead_steps == 0
    return outs


@pytest.fixture
def pair(folder, monkeypatch):
    return engine(folder, monkeypatch, True), engine(folder, monkeypatch, False)


@pytest.fixture(scope="module")
def reference(folder) -> list[list[int]]:
    """Greedy outputs of PROMPTS (12 tokens, eos ignored) from the default synchronous engine."""
    llm = LLM(folder, compile=False, device="cpu", cpu_kv_cache_bytes=SMALL_KV, async_scheduling=False)
    return [o.token_ids for o in llm.generate(PROMPTS, greedy(12, ignore_eos=True), use_tqdm=False)]


def dropped_rows(llm: LLM, monkeypatch) -> list[int]:
    """Spy: one item per row of a step run ahead whose sequence had stopped (computed, not sampled)."""
    dropped: list[int] = []
    sample_async = llm.runner.sample_async

    def spy(launched, rows=None):
        if rows is not None:
            dropped.extend(set(range(len(launched.batch.entries))) - set(rows))
        return sample_async(launched, rows)

    monkeypatch.setattr(llm.runner, "sample_async", spy)
    return dropped


def test_greedy_with_stops_and_eos_in_the_middle_of_the_batch(pair, reference, monkeypatch):
    async_llm, sync_llm = pair
    dropped = dropped_rows(async_llm, monkeypatch)
    eos = frozenset({first_new(reference[3], 3)})  # prompt 3 (and maybe others) end on eos
    for llm in pair:
        monkeypatch.setattr(llm.scheduler, "eos_token_ids", eos)
    params = stopping_params(reference)
    (out,) = compare(async_llm, sync_llm, (PROMPTS, params))
    assert [o.token_ids for o in out] == truncated(reference, params, eos)
    assert out[3].finish_reason == "stop" and len({len(o.token_ids) for o in out}) >= 4
    assert dropped


def random_params(temperature: float, **kwargs) -> list[SamplingParams]:
    """Prompts 0, 2 and 4 stop on any of 32 ids (1 in 8 of the vocabulary): at random steps."""
    return [SamplingParams(temperature=temperature, max_tokens=12 - i, ignore_eos=True,
                           stop_token_ids=tuple(range(i, TINY["vocab_size"], 8)) if i % 2 == 0 else (), **kwargs)
            for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 20, "top_p": 0.9, "seed": 3}], ids=["global-rng", "seeded"])
def test_sampling_draws_the_same_numbers(pair, monkeypatch, kwargs):
    async_llm, sync_llm = pair
    dropped = dropped_rows(async_llm, monkeypatch)
    params = random_params(0.8, **kwargs)
    mixed = [params[0], greedy(10), SamplingParams(temperature=1.1, seed=5, max_tokens=11)] + params[3:]
    outs = compare(async_llm, sync_llm, (PROMPTS, params), (PROMPTS, mixed), (PROMPTS[::-1], params[::-1]), seed=0)
    assert dropped and {o.finish_reason for out in outs for o in out} == {"stop", "length"}


def test_prefix_caching_across_calls(pair):
    prefix = [(5 * i + 3) % 250 + 3 for i in range(14)]  # 3.5 blocks of 4
    prompts = [prefix + [10, 11], prefix + [200, 201, 202], prefix[:9] + [7]]
    async_llm, sync_llm = pair
    compare(async_llm, sync_llm, (prompts[:1], greedy(10)), (prompts, greedy(9, stop_token_ids=(7, 19))))
    assert async_llm.block_manager.stats.hit_blocks >= 6


def test_preemption_under_a_tiny_kv_cache(folder, monkeypatch):
    small = {"cpu_kv_cache_bytes": 12 * BLOCK_BYTES}  # 12 blocks; the 5 prompts alone need 14
    async_llm, sync_llm = (engine(folder, monkeypatch, flag, **small) for flag in (True, False))
    compare(async_llm, sync_llm, (PROMPTS, greedy(12, ignore_eos=True)))
    assert async_llm.num_blocks == 12 and async_llm.scheduler.num_preemptions > 0


def test_chunked_prefill_and_a_queue(folder, monkeypatch, reference):
    small = {"max_num_batched_tokens": 8, "max_num_seqs": 3}
    async_llm, sync_llm = (engine(folder, monkeypatch, flag, **small) for flag in (True, False))
    params = stopping_params(reference)
    (out,) = compare(async_llm, sync_llm, (PROMPTS, params))
    assert [o.token_ids for o in out] == truncated(reference, params, async_llm.eos_token_ids)


def test_requests_in_separate_calls_and_bad_requests(pair, reference):
    async_llm, sync_llm = pair
    bad = [PROMPTS[0], [], [5] * 200, PROMPTS[2], [3, 256]]
    outs = compare(async_llm, sync_llm, (PROMPTS[:2], greedy(6)), (bad, greedy(12, ignore_eos=True)),
                   (PROMPTS[3:], greedy(4)))
    assert [o.finish_reason for o in outs[1]] == ["length", "error", "error", "length", "error"]
    assert [outs[1][0].token_ids, outs[1][3].token_ids] == [reference[0], reference[2]]


def test_no_effect_without_full_decode_graphs(folder):
    llm = LLM(folder, compile=False, device="cpu", cpu_kv_cache_bytes=SMALL_KV, async_scheduling=True)
    llm.generate(PROMPTS, greedy(4), use_tqdm=False)
    assert llm.scheduler.num_ahead_steps == 0 and not llm.runner.graphs.buffers


@pytest.mark.gpu
def test_async_matches_sync_on_cuda(tmp_path, monkeypatch):
    """With real full decode graphs (forward + LM head) and Triton paged attention: input ids
    gathered on the device from the running step's tokens, batches shrinking across capture
    sizes, stopped rows in the middle; greedy, global-RNG (the Gumbel kernel) and seeded rows."""
    llm = LLM(save_checkpoint(tmp_path / "llama", head_dim=64), dtype="float32", device="cuda", compile=True,
              gpu_memory_utilization=0.3, compile_options={"inner_compiler": "eager"}, max_num_seqs=16,
              max_num_batched_tokens=256, block_size=4, async_scheduling=True)
    assert llm.runner.graphs.full and set(llm.runner.graphs.decode.graphs) == set(llm.runner.graphs.sizes)
    dropped = dropped_rows(llm, monkeypatch)
    prompts = [p[i:] + p[:i] for i in range(3) for p in PROMPTS]  # 15 sequences
    reference = [o.token_ids for o in llm.generate(prompts, greedy(12, ignore_eos=True), use_tqdm=False)]
    stopping = [sp for i in range(0, 15, 5) for sp in stopping_params(reference[i:i + 5])]
    cases = {"greedy": stopping, "global-rng": random_params(0.8) * 3,
             "seeded": random_params(1.0, top_p=0.9, seed=3) * 3,
             "mixed": [greedy(12), SamplingParams(temperature=0.7, max_tokens=9)] * 7 + [greedy(5)]}
    for name, params in cases.items():
        outs = []
        for async_scheduling in (True, False):
            monkeypatch.setattr(llm.engine_loop, "async_scheduling", async_scheduling)
            before = llm.scheduler.num_ahead_steps
            torch.manual_seed(0)
            outs.append(results(llm.generate(prompts, params, use_tqdm=False)))
            assert (llm.scheduler.num_ahead_steps > before) == async_scheduling, name
        assert outs[0] == outs[1], name
    greedy_out = llm.generate(prompts, stopping, use_tqdm=False)
    assert [o.token_ids for o in greedy_out] == truncated(reference, stopping, llm.eos_token_ids)
    assert dropped and {o.finish_reason for o in greedy_out} == {"stop", "length"}
