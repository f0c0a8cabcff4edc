"""QKNormRotaryPass: Qwen3's q/k RMSNorms join the rotary op that reads them; look-alikes stay."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.fx.experimental.proxy_tensor import make_fx

import infer.compiler as ic
from conftest import DEVICES
from fx_helpers import aten_graph, context_for, op_counts, run_pass
from infer.compiler.config import CompilerConfig
from infer.compiler.inner import decomposition_table
from infer.models.loader import load_model
from infer.passes.base import PassContext
from infer.passes.manager import PassManager, PassOptions, build_passes
from infer.passes.qk_norm_rotary import QKNormRotaryPass
from infer.passes.rms_norm import RMSNormPass
from infer.runtime.attention import Attention, AttentionMetadata, forward_context

FUSED, ROTARY, RMS = "infer.qk_norm_rotary.default", "infer.rotary_embedding.default", "infer.rms_norm.default"
T, HQ, HK, D, R = 3, 4, 2, 16, 16
EXACT = dict(atol=0, rtol=0)
infer = torch.ops.infer


def rms(x, w, eps):
    """Hugging Face Qwen3RMSNorm."""
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def qwen3(x, w_qkv, q_w, k_w, cos, sin):
    """Packed projection, per-head q/k norms with their own eps, then RoPE."""
    q, k, _ = F.linear(x, w_qkv).split([HQ * D, HK * D, HK * D], dim=-1)
    q = rms(q.view(-1, HQ, D), q_w, 1e-6)  # [T, Hq, D]
    k = rms(k.view(-1, HK, D), k_w, 1e-5)  # [T, Hk, D]
    return infer.rotary_embedding(q, k, cos, sin)


def inputs(dtype, rot=R):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cos, sin = r(T, rot).chunk(2, dim=-1)  # [T, rot/2] each
    return (r(T, 32).to(dtype), r((HQ + 2 * HK) * D, 32).to(dtype), (1 + 0.3 * r(D)).to(dtype),
            (1 + 0.3 * r(D)).to(dtype), cos, sin)


def prepared(fn, *args):
    """Trace and run the norm pass, which comes first in the pipeline."""
    gm = aten_graph(fn, *args)
    run_pass(RMSNormPass, gm)
    return gm


def check_numbers(gm, fn, args):
    """On CPU the fused op is the unfused chain, so the numbers are equal bit for bit."""
    torch.testing.assert_close(gm(*args), fn(*args), **EXACT)


@pytest.mark.parametrize("rot", [R, R // 2], ids=["full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_norms_and_rotary_become_one_op(dtype, rot):
    args = inputs(dtype, rot)
    gm = prepared(qwen3, *args)
    before = op_counts(gm)
    assert before[RMS] == 2 and before[ROTARY] == 1 and before[FUSED] == 0
    rewrites, _ = run_pass(QKNormRotaryPass, gm)
    after = op_counts(gm)
    assert rewrites == 1
    assert after[FUSED] == 1 and after[RMS] == 0 and after[ROTARY] == 0
    fused = next(n for n in gm.graph.nodes if str(n.target) == FUSED)
    assert fused.args[2] == 1e-6 and fused.args[7] == 1e-5  # each norm keeps its own eps
    check_numbers(gm, qwen3, args)


def llama(x, w_qkv, q_w, k_w, cos, sin):
    q, k, _ = F.linear(x, w_qkv).split([HQ * D, HK * D, HK * D], dim=-1)
    return infer.rotary_embedding(q.view(-1, HQ, D), k.view(-1, HK, D), cos, sin)


def norm_used_twice(x, w_qkv, q_w, k_w, cos, sin):
    q, k, _ = F.linear(x, w_qkv).split([HQ * D, HK * D, HK * D], dim=-1)
    q = rms(q.view(-1, HQ, D), q_w, 1e-6)
    k = rms(k.view(-1, HK, D), k_w, 1e-6)
    return infer.rotary_embedding(q, k, cos, sin), q.sum()


def only_q_normed(x, w_qkv, q_w, k_w, cos, sin):
    q, k, _ = F.linear(x, w_qkv).split([HQ * D, HK * D, HK * D], dim=-1)
    return infer.rotary_embedding(rms(q.view(-1, HQ, D), q_w, 1e-6), k.view(-1, HK, D), cos, sin)


def whole_projection_norm(x, w_qkv, q_w, k_w, cos, sin):
    """OLMo2-style: the norm runs over all of q (and k) before the heads are split off."""
    q, k, _ = F.linear(x, w_qkv).split([HQ * D, HK * D, HK * D], dim=-1)
    q = rms(q, q_w.repeat(HQ), 1e-6).view(-1, HQ, D)
    k = rms(k, k_w.repeat(HK), 1e-6).view(-1, HK, D)
    return infer.rotary_embedding(q, k, cos, sin)


def one_norm_for_both(x, w_qkv, q_w, k_w, cos, sin):
    q = rms(F.linear(x, w_qkv)[:, : HQ * D].view(-1, HQ, D), q_w, 1e-6)
    return infer.rotary_embedding(q, q, cos, sin)


# fn -> near miss expected in the report (None: not even close)
LEFT_ALONE = {llama: None, norm_used_twice: "q norm has other users", only_q_normed: None,
              whole_projection_norm: "view sits between", one_norm_for_both: None}


@pytest.mark.parametrize("fn", list(LEFT_ALONE), ids=lambda f: f.__name__)
def test_look_alikes_are_left_alone(fn):
    args = inputs(torch.bfloat16)
    gm = prepared(fn, *args)
    before = op_counts(gm)
    rewrites, context = run_pass(QKNormRotaryPass, gm)
    assert rewrites == 0 and op_counts(gm) == before
    reason = LEFT_ALONE[fn]
    misses = [m for m in context.near_misses if m.startswith("qk_norm_rotary")]
    assert (reason is None and not misses) or any(reason in m for m in misses), misses
    check_numbers(gm, fn, args)


def test_flag_and_order():
    context = PassContext()
    names = lambda config: [p.name for p in build_passes(PassOptions.of(config), context)]  # noqa: E731
    on = names(CompilerConfig())
    assert on.index("rms_norm") < on.index("qk_norm_rotary") < on.index("linear_prologue")
    assert "qk_norm_rotary" not in names(CompilerConfig(fuse_qk_norm_rope=False))
    assert "qk_norm_rotary" not in names(CompilerConfig(fuse_norm=False))
    with pytest.raises(ValueError, match="fuse_qk_norm_rope"):
        CompilerConfig(fuse_qk_norm_rope=1)


# ---------------------------------------------------------------- our models, whole
LAYERS = 2
BLOCK = 4


def our_model(kind, tmp_path, device="cpu"):
    head_dim = 64 if device == "cuda" else 16  # the CUDA attention kernels take head_dim 64, 128, 256
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{kind}ForCausalLM")(config)
    with torch.no_grad():  # non-unit norm weights, so that a misplaced norm shows in the numbers
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.float32, device=device)
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.zeros(2, 16, BLOCK, m.num_kv_heads, m.head_dim, device=device))
    return model


def prefill(device):
    metadata = AttentionMetadata.build([5, 3], [5, 3], [[1, 2], [3, 4]], BLOCK, device)
    ids = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(0)).to(device)
    return ids, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=device), metadata


EXPECTED = {"Qwen3": {FUSED: LAYERS, ROTARY: 0}, "Llama": {FUSED: 0, ROTARY: LAYERS}}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_model_graph_holds_one_op_per_layer(kind, tmp_path):
    """The full pass list on the model's ATen graph: no q/k norm or rotary op is left beside the fused one."""
    model = our_model(kind, tmp_path)
    ids, positions, metadata = prefill("cpu")
    with forward_context(metadata), torch.no_grad():
        gm = make_fx(model, decomposition_table=decomposition_table())(ids, positions)
        context = context_for(gm)
        PassManager(PassOptions(), context)(gm.graph)
    counts = op_counts(gm)
    assert {op: counts[op] for op in EXPECTED[kind]} == EXPECTED[kind]
    head_norms = [n for n in gm.graph.nodes if str(n.target) == RMS and n.args[0].meta["val"].dim() == 3]
    assert head_norms == []
    assert context.fusions.get("qk_norm_rotary", 0) == EXPECTED[kind][FUSED]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_compiled_model_matches_eager(kind, device, tmp_path):
    model = our_model(kind, tmp_path, device)
    ids, positions, metadata = prefill(device)
    with forward_context(metadata), torch.inference_mode():
        expected = model(ids, positions)
        compiled = torch.compile(model.forward, backend="infer", options={"inner_compiler": "eager"})
        actual = compiled(ids, positions)
    report = ic.last_report()
    assert report.fusions.get("qk_norm_rotary", 0) == EXPECTED[kind][FUSED], report.near_misses
    assert report.fusions.get("rms_norm", 0) == (2 * LAYERS if kind == "Qwen3" else 0)  # q/k norms still counted
    assert report.fusions["fused_add_rms_norm"] == 2 * LAYERS + 1  # the final norm reads the last add
    spelled_out = LAYERS if kind == "Llama" and device == "cpu" else 0  # the rotaries no pass fused, on CPU
    assert report.fusions.get("rotary spelled out (cpu)", 0) == spelled_out
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
