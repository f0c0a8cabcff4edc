"""Hugging Face ``generate`` with a ``forward`` compiled by backend="infer": eager's tokens.

The usual way to use the backend on a HF model: prefill and cached decode steps (one new token
against a ``DynamicCache``) both run through the compiled, fused graphs. Gemma 3 is here for its
q/k norms over transposed views: strided at prefill (left alone), contiguous at one token (fused).
"""
import pytest
import torch

import infer.compiler as ic
from tiny_hf import tiny_model


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_greedy_generate_matches_eager(name):
    model = tiny_model(name)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(ids, **kwargs)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="infer", options={"inner_compiler": "eager"})
        actual = model.generate(ids, **kwargs)
    assert torch.equal(actual, expected), (actual, expected)
    fusions = ic.last_report().fusions  # the last compile: a cached decode step
    assert fusions.get("fused_add_rms_norm", 0) > 0 and fusions.get("pack(q,k,v)", 0) > 0, fusions
