"""Unmodified HF models compiled with backend="infer": eager numbers and the exact fusion counts."""
import subprocess
import sys
import textwrap

import pytest
import torch

import infer.compiler as ic
from conftest import DEVICES
from tiny_hf import logits_of, tiny_model

L = 2  # layers of every tiny model
QKV, GATE_UP = "pack(q,k,v)", "pack(gate,up)"  # named by the projections packed
LLAMA_FAMILY = {"rms_norm": 1, "fused_add_rms_norm": 2 * L, QKV: L, GATE_UP: L, "silu_and_mul": L}
EXPECTED = {
    "llama": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen3": dict(LLAMA_FAMILY, rms_norm=1 + 2 * L),           # + q/k norms per layer
    "phi3": dict(LLAMA_FAMILY, **{QKV: 0, GATE_UP: 0}),        # already packed in the checkpoint
    "gemma": dict(LLAMA_FAMILY, silu_and_mul=0),               # GELU-gated MLP; 1 + w norms fused
    # q/k norms over transposed views stay eager (their layout is viewed later); Gemma 3's
    # post-attention / post-feedforward norms are plain norms, its pre-feedforward one takes the add
    "gemma3": dict(LLAMA_FAMILY, silu_and_mul=0, rms_norm=1 + 2 * L, fused_add_rms_norm=2 * L),
    # post-norms (OLMo 2 style): one plain norm per sublayer, the final norm takes the last add
    "exaone4": dict(LLAMA_FAMILY, rms_norm=2 * L, fused_add_rms_norm=1),
    "gpt2": {},                                                # LayerNorm, Conv1D: nothing to fuse
}
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_fusions_and_numbers(name, dtype, device):
    model = tiny_model(name, dtype, device)
    ids = torch.randint(0, 128, (2, 11), device=device)
    with torch.inference_mode():
        expected = logits_of(model, ids)
        compiled = torch.compile(model, backend="infer", options={"inner_compiler": "eager"})
        actual = logits_of(compiled, ids)
        again = logits_of(compiled, ids)
    report = ic.last_report()
    assert report.fusions == {k: v for k, v in EXPECTED[name].items() if v}, report.near_misses
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(again, actual, rtol=0, atol=0)


def test_fusions_under_inductor_match_eager():
    model = tiny_model("qwen3", torch.float32)
    ids = torch.randint(0, 128, (3, 5))
    with torch.inference_mode():
        expected = logits_of(model, ids)
        actual = logits_of(torch.compile(model, backend="infer"), ids)
    assert ic.last_report().fusions == EXPECTED["qwen3"]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_disabled_passes_fuse_nothing():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 4))
    options = {"inner_compiler": "eager", "fuse_norm": False, "fuse_gemm": False, "fuse_activation": False,
               "fuse_linear": False, "decompose_on_cpu": False}
    with torch.inference_mode():
        logits_of(torch.compile(model, backend="infer", options=options), ids)
    assert ic.last_report().fusions == {}
    assert set(ic.last_report().passes) == {"noop_elimination", "defunctionalize"}


def test_in_place_weight_update_reaches_packed_gemm():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 6))
    compiled = torch.compile(model, backend="infer", options={"inner_compiler": "eager"})
    with torch.inference_mode():
        logits_of(compiled, ids)
    fresh = tiny_model("llama", seed=1)
    model.load_state_dict(fresh.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(logits_of(compiled, ids), logits_of(fresh, ids), atol=1e-5, rtol=1e-5)


_MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch, transformers
    sys.path.insert(0, "tests")
    from tiny_hf import tiny_model, logits_of
    import infer.compiler as ic
    fuse_gemm = sys.argv[1] == "1"
    with torch.inference_mode():  # warm imports and Dynamo on a tiny model first
        logits_of(torch.compile(tiny_model("llama"), backend="infer",
                                options={"inner_compiler": "eager"}), torch.randint(0, 128, (1, 4)))
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.inference_mode():
        logits_of(model, ids)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.inference_mode():
        logits_of(torch.compile(model, backend="infer",
                                options={"inner_compiler": "eager", "fuse_gemm": fuse_gemm}), ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert ic.last_report().fusions.get("pack(q,k,v)", 0) == (6 if fuse_gemm else 0), ic.last_report().fusions
    print((after - before) / param_bytes)
""")


def _peak_growth(fuse_gemm: bool) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "1" if fuse_gemm else "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_packing_does_not_raise_peak_memory():
    """Peak RSS of a compile with GEMM packing exceeds the same compile without it by at most 5% of
    the parameter bytes (copying the weights instead of re-viewing them would add 100%)."""
    extra = _peak_growth(True) - _peak_growth(False)
    assert extra <= 0.05, f"packing raised peak memory by {extra:.1%} of the parameter bytes"
