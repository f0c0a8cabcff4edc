"""The offline engine end to end on tiny random checkpoints: greedy output equals transformers'."""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest
import torch
import transformers

from infer.compiler import compilation_count, last_report
from infer.compiler.stages import CachedStage, DirectStage, PlainStage
from infer.compiler.report import REPORTS
from infer import LLM, RequestOutput, SamplingParams
from infer.runtime.engine.config import EngineConfig
from tiny_hf import CAUSAL_LM_TINY as TINY, make_hf_model, word_tokenizer

KINDS = ("llama", "qwen2", "qwen3")
SPECIAL = ["<unk>", "<s>", "</s>"]
PROMPTS = [[17, 3, 99, 45, 200], [5, 81, 9, 230, 14, 66, 7, 150, 42, 8, 31],
           [(7 * i + 11) % 250 + 3 for i in range(23)]]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SMALL_KV = 1 << 20  # bytes: plenty for these tests, quick to allocate
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``<unk> <s> </s> hello world w5 w6 ...``."""
    words = SPECIAL + ["hello", "world"] + [f"w{i}" for i in range(len(SPECIAL) + 2, vocab_size)]
    return word_tokenizer(words, CHAT_TEMPLATE)


def save_tiny_checkpoint(kind: str, folder: Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Save a tiny fp32 HF model (non-trivial norms and biases) and a tokenizer into ``folder``."""
    model = make_hf_model(kind, seed, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model


@torch.inference_mode()
def hf_greedy(model: transformers.PreTrainedModel, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt on its own (no padding), eos ignored."""
    model.generation_config.eos_token_id = None
    outs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``kind -> (folder, hf greedy outputs of PROMPTS)`` for llama, qwen2 and qwen3."""
    root = tmp_path_factory.mktemp("tiny_llm")
    built = {}
    for kind in KINDS:
        model = save_tiny_checkpoint(kind, root / kind)
        built[kind] = (root / kind, hf_greedy(model, PROMPTS, MAX_TOKENS))
    return built


def dynamo_frames() -> int:
    return REPORTS.frames_compiled()


def make_llm(folder: Path, inner: str | None = None, **kwargs) -> LLM:
    """``inner=None``: no compile; else compile with that inner compiler."""
    kwargs.setdefault("cpu_kv_cache_bytes", SMALL_KV)
    return LLM(folder, compile=inner is not None, compile_options={"inner_compiler": inner or "eager"},
               device="cpu", **kwargs)


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outputs]


@pytest.mark.parametrize("kind, inner", [(k, c) for k in KINDS for c in (None, "eager")] + [("llama", "inductor")])
def test_greedy_matches_transformers(tiny, kind, inner):
    folder, expected = tiny[kind]
    llm = make_llm(folder, inner, block_size=4)
    before = compilation_count()
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == expected
    assert [o.prompt_token_ids for o in outputs] == PROMPTS
    assert all(o.finish_reason == "length" and o.error is None for o in outputs)
    compiled = compilation_count() - before
    # One dynamic-T graph for every layer and finish; prepare too, except with the eager inner
    # compiler, where it runs as written (nothing in it to fuse).
    assert compiled == {None: 0, "eager": 2, "inductor": 3}[inner]
    if inner:  # after the first compiled call, stages run without Dynamo's guards
        stages = llm.runner.forward.stages
        assert isinstance(stages.prepare, PlainStage if inner == "eager" else DirectStage)
        assert isinstance(stages.layer, DirectStage) and isinstance(stages.finish, DirectStage)
    assert token_ids(llm.generate(PROMPTS[::-1], GREEDY, use_tqdm=False)) == expected[::-1]
    assert compilation_count() - before == compiled  # new batch shapes reuse the graphs


def test_whole_forward_compile_matches_transformers_too(tiny):
    folder, expected = tiny["qwen3"]
    llm = make_llm(folder, "eager", block_size=4, staged_compile=False)
    before = compilation_count()
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert compilation_count() - before == 1  # one graph for the whole forward


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_greedy_matches_transformers_on_cuda(tmp_path, monkeypatch, mode):
    """Triton paged attention (head_dim 64), CUDA KV sizing and padded decode batches; in full
    mode every decode step replays a runner-captured graph (forward + LM head)."""
    from infer.compiler.cudagraph import CudaGraphWrapper
    gc.collect()
    torch.cuda.empty_cache()  # KV sizing reads free device memory: drop what earlier tests cached
    model = save_tiny_checkpoint("llama", tmp_path / "llama", head_dim=64)
    expected = hf_greedy(model, PROMPTS, MAX_TOKENS)
    import threading
    from triton import knobs
    compiled = []  # (kernel, thread) of every Triton compile from here on
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda *, fn, **_: compiled.append((fn.name, threading.current_thread().name)))
    llm = LLM(tmp_path / "llama", dtype="float32", device="cuda", compile=True, gpu_memory_utilization=0.3,
              compile_options={"inner_compiler": "eager", "cudagraph_mode": mode}, max_num_seqs=8,
              max_num_batched_tokens=256)
    assert llm.runner.graphs.padded_size(3) == 4 and llm.num_blocks > 0
    at_start = list(compiled)
    replays = []
    replay = CudaGraphWrapper.replay
    monkeypatch.setattr(CudaGraphWrapper, "replay", lambda self, *a: replays.append(self) or replay(self, *a))
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    if mode == "full":
        assert set(llm.runner.graphs.decode.graphs) == set(llm.runner.graphs.sizes)
        assert sum(r is llm.runner.graphs.decode for r in replays) >= MAX_TOKENS - 1  # every decode step
        # Dry steps at startup had every kernel compiled on the pool (runtime/kernels/precompile.py):
        # none compiled on the main thread, none left for the first requests.
        assert all(thread.startswith("triton-compile") for _, thread in at_start), at_start
        assert compiled == at_start, compiled[len(at_start):]
    else:
        assert llm.runner.graphs.decode is None and replays  # the backend's pieces replay


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_compile_cache_serves_a_second_engine(tiny, tmp_path, kind):
    """The first engine compiles and stores its graph; a second one on the same checkpoint loads
    it without a Dynamo compile and generates the same tokens."""
    folder, expected = tiny[kind]
    first = make_llm(folder, "eager", block_size=4, compile_cache_dir=str(tmp_path))
    before = compilation_count()
    assert token_ids(first.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert compilation_count() > before
    assert any(tmp_path.iterdir())
    assert not last_report().cached
    torch._dynamo.reset()
    second = make_llm(folder, "eager", block_size=4, compile_cache_dir=str(tmp_path))
    frames = dynamo_frames()
    assert token_ids(second.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert last_report().cached and dynamo_frames() == frames  # loaded: Dynamo never ran
    for engine, kind_ in ((first, DirectStage), (second, CachedStage)):  # compiled here / loaded
        stages = engine.runner.forward.stages
        assert isinstance(stages.prepare, PlainStage)  # the eager inner compiler leaves it as written
        assert isinstance(stages.layer, kind_) and isinstance(stages.finish, kind_)
    off = make_llm(folder, "eager", block_size=4, compile_cache_dir="")
    assert off.runner.forward.cache_dir is None


def test_padded_decode_batches_give_the_same_output(tiny, monkeypatch):
    """The CUDA-graph padding path, exercised on CPU: decode batches of 3 run as 4 tokens."""
    folder, expected = tiny["qwen2"]
    llm = make_llm(folder, "eager", block_size=4)
    monkeypatch.setattr(llm.runner.graphs, "sizes", (1, 2, 4, 8))
    seen = []
    forward = llm.runner.forward

    def spy(input_ids, positions, metadata, step=None):
        seen.append((input_ids.shape[0], metadata.slot_mapping.tolist(), metadata.block_tables.shape[1]))
        return forward(input_ids, positions, metadata, step)

    monkeypatch.setattr(llm.runner, "forward", spy)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    decode = seen[1:]
    assert decode and all(n == 4 and slots[3] == -1 and width == 32 for n, slots, width in decode)


def test_batch_invariance_greedy_and_seeded(tiny):
    llm = make_llm(tiny["llama"][0])
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, seed=i, ignore_eos=True) for i in range(3)]
    batched = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    batched_seeded = token_ids(llm.generate(PROMPTS, seeded, use_tqdm=False))
    for i, prompt in enumerate(PROMPTS):
        assert token_ids(llm.generate([prompt], GREEDY, use_tqdm=False)) == [batched[i]]
        assert token_ids(llm.generate([prompt], seeded[i], use_tqdm=False)) == [batched_seeded[i]]


def test_prefix_caching_reuses_blocks_with_same_output(tiny):
    prefix = [(5 * i + 3) % 250 + 3 for i in range(40)]  # 2.5 blocks of 16
    prompts = [prefix + [10, 11, 12, 13], prefix + [200, 201]]
    cached = make_llm(tiny["qwen2"][0])
    uncached = make_llm(tiny["qwen2"][0], enable_prefix_caching=False)
    first = cached.generate(prompts[:1], GREEDY, use_tqdm=False)
    both = cached.generate(prompts, GREEDY, use_tqdm=False)
    expected = token_ids(uncached.generate(prompts, GREEDY, use_tqdm=False))
    assert token_ids(first) == expected[:1] and token_ids(both) == expected
    assert cached.block_manager.stats.hit_blocks >= 4  # 2 prefix blocks for each prompt of the 2nd call
    assert uncached.block_manager.stats.hit_blocks == 0


def test_preemption_recomputes_to_the_same_output(tiny):
    folder = tiny["llama"][0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = token_ids(make_llm(folder, block_size=4).generate(PROMPTS, params, use_tqdm=False))
    block_bytes = 2 * TINY["num_hidden_layers"] * 4 * TINY["num_key_value_heads"] * TINY["head_dim"] * 4
    small = make_llm(folder, block_size=4, cpu_kv_cache_bytes=12 * block_bytes)  # 48 tokens, 3 seqs need 76
    assert small.num_blocks == 12
    assert token_ids(small.generate(PROMPTS, params, use_tqdm=False)) == expected
    assert small.scheduler.num_preemptions > 0


def test_chunked_prefill_gives_the_same_output(tiny, monkeypatch):
    folder, expected = tiny["qwen3"]
    llm = make_llm(folder, max_num_batched_tokens=8, max_num_seqs=4)
    chunks = []
    run = llm.runner.run

    def spy(batch):
        chunks.extend(e for e in batch.entries if not e.sample)
        return run(batch)

    monkeypatch.setattr(llm.runner, "run", spy)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert chunks and max(e.num_new_tokens for e in chunks) <= 8


def test_bad_requests_fail_alone(tiny):
    folder, expected = tiny["llama"]
    llm = make_llm(folder)
    prompts = [PROMPTS[0], [], [5] * 200, PROMPTS[2], [3, 256], [True, 3], [-1, 3], [4.0]]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert token_ids([outputs[0], outputs[3]]) == [expected[0], expected[2]]
    errors = {i: o.error for i, o in enumerate(outputs) if o.finish_reason == "error"}
    assert sorted(errors) == [1, 2, 4, 5, 6, 7]
    assert "empty" in errors[1] and "max_model_len=128" in errors[2] and "[0, 256)" in errors[4]
    assert "[True]" in errors[5] and "[-1]" in errors[6] and "[4.0]" in errors[7]
    text = llm.generate(["hello world", ""], GREEDY, use_tqdm=False)
    assert text[0].error is None and text[0].prompt_token_ids == [3, 4] and len(text[0].text.split()) == MAX_TOKENS
    assert text[1].finish_reason == "error" and "empty" in text[1].error


def test_usage_errors(tiny, tmp_path):
    folder = tiny["llama"][0]
    llm = make_llm(folder)
    with pytest.raises(ValueError, match="at least one prompt"):
        llm.generate([], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(PROMPTS, [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="chat=True needs string prompts"):
        llm.generate(PROMPTS, GREEDY, chat=True)
    with pytest.raises(ValueError, match="-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "missing", compile=False)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**config, "architectures": ["OddForCausalLM"]}))
    (tmp_path / "odd" / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="unsupported model architecture: OddForCausalLM"):
        LLM(tmp_path / "odd", compile=False)
    with pytest.raises(ValueError, match="TP > 1"):
        LLM(folder, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=128"):
        make_llm(folder, max_model_len=4096)
    with pytest.raises(TypeError, match="unknown arguments"):
        make_llm(folder, max_num_sequences=3)


def test_chat_template_is_applied(tiny):
    llm = make_llm(tiny["llama"][0])
    out = llm.generate("hello world", GREEDY, use_tqdm=False, chat=True)[0]
    assert out.prompt == "hello world" and out.prompt_token_ids == [3, 4] and len(out.token_ids) == MAX_TOKENS


@pytest.mark.parametrize("kwargs, bad", [
    ({"max_num_seqs": 0}, "0"), ({"block_size": -4}, "-4"), ({"gpu_memory_utilization": 1.5}, "1.5"),
    ({"dtype": "int8"}, "int8"), ({"device": "tpu"}, "tpu"), ({"max_num_batched_tokens": 8}, "8"),
    ({"async_scheduling": "yes"}, "async_scheduling must be True or False, got 'yes'"),
])
def test_engine_config_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        EngineConfig(model="m", **kwargs)


def test_engine_config_is_frozen_and_resolves_max_model_len():
    config = EngineConfig(model="m", compile_options={"inner_compiler": "eager", "cudagraph_capture_sizes": [4, 1]},
                          max_num_seqs=20)
    assert config.compile_options_dict == {"cudagraph_capture_sizes": (4, 1), "inner_compiler": "eager"}
    assert config.cudagraph_capture_sizes == (1, 2, 4, 8, 16, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 32
    hf = transformers.LlamaConfig(max_position_embeddings=8192)
    assert config.resolve(hf).max_model_len == 4096 and config.max_model_len is None
    assert dataclasses.replace(config, max_model_len=100).resolve(hf).max_model_len == 100
