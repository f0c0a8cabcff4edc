"""`python -m infer generate` on a tiny random checkpoint with a tiny word-level tokenizer."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_hf import word_tokenizer

from infer.cli import main

VOCAB = 128
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a whitespace tokenizer ``<unk> <s> </s> hello w4 w5 ...``."""
    folder = tmp_path_factory.mktemp("tiny_cli")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>", "hello"] + [f"w{i}" for i in range(4, VOCAB)]
    word_tokenizer(words, CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def test_generate_subprocess_prints_completion_and_throughput(tiny_dir):
    cmd = [sys.executable, "-m", "infer", "generate", "--model", str(tiny_dir), "--max-tokens", "4",
           "--ignore-eos", "--inner-compiler", "eager", "hello"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[0] prompt: 'hello'" in proc.stdout
    assert re.search(r"\[0\] completion \(4 tokens, length\): '[\w ]+'", proc.stdout), proc.stdout
    assert re.search(r"generated 4 tokens in [\d.]+ s: [\d.]+ tokens/s", proc.stdout), proc.stdout


def test_generate_in_process_chat_and_errors(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--max-tokens", "3", "--no-compile", "--chat"]
    assert main(args + ["hello", "w5 w6 w7"]) == 0
    out = capsys.readouterr().out
    assert "[1] prompt: 'w5 w6 w7'" in out and "compile=off" in out
    assert main(args + ["hello", ""]) == 1  # one bad request: the other still completes
    out = capsys.readouterr().out
    assert "[0] completion" in out and "[1] error: prompt is empty" in out
    assert main(["generate", "--model", str(tiny_dir / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--temperature", "-1", "hi"]) == 2
    assert "temperature" in capsys.readouterr().err
