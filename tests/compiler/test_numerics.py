"""Compiled HF models match eager, with both inner compilers, fp32 and bf16."""
import pytest
import torch

from conftest import DEVICES
from tiny_hf import logits_of, tiny_model

TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gpt2", "bert"])
def test_compiled_matches_eager(name, inner, dtype, device):
    model = tiny_model(name, dtype, device)
    ids = torch.randint(0, 128, (2, 9), device=device)
    with torch.inference_mode():
        expected = logits_of(model, ids)
        compiled = torch.compile(model, backend="infer", options={"inner_compiler": inner})
        actual = logits_of(compiled, ids)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
