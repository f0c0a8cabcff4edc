"""The default model (SmolLM2-135M-Instruct) through the engine: greedy output equals transformers'."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from infer.models import default
from infer import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(default.GGUF_PACKAGE) is None, reason=default.INSTALL_HINT),
]


@pytest.fixture(scope="module")
def reference():
    """``(model folder, prompt ids, transformers' greedy continuations)``, fp32 on CPU."""
    path = default.default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    outputs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
            outputs.append(out[0, len(ids):].tolist())
    return path, prompt_ids, outputs


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_default_model_greedy_matches_transformers(reference, compile):
    path, prompt_ids, expected = reference
    llm = LLM(None, dtype="float32", device="cpu", compile=compile, compile_options={"inner_compiler": "eager"},
              cpu_kv_cache_bytes=64 << 20)
    assert llm.config.model == str(path) and llm.config.max_model_len == 4096
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompt_ids
    assert [o.token_ids for o in outputs] == expected
    assert outputs[0].text.strip().startswith("Paris")
