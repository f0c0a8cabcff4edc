"""The q/k norm + rotary moved into the paged-attention call: structure, numbers, what must not match."""
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from conftest import DEVICES
from fx_helpers import context_for, op_counts
from infer.compiler.config import CompilerConfig
from infer.compiler.inner import decomposition_table
from infer.passes.manager import PassManager
from infer.runtime.attention import forward_context

sys.path.insert(0, str(Path(__file__).parent))
from test_qk_norm_rotary import FUSED, LAYERS, ROTARY, our_model, prefill  # noqa: E402

ATTN = "infer.paged_attention.default"


def _graph(kind, tmp_path, config=CompilerConfig()):
    model = our_model(kind, tmp_path)
    ids, positions, metadata = prefill("cpu")
    with forward_context(metadata), torch.no_grad():
        gm = make_fx(model, decomposition_table=decomposition_table())(ids, positions)
        context = context_for(gm)
        PassManager(config, context)(gm.graph)
    return gm, context


@pytest.mark.parametrize("kind, qk_norm", [("Qwen3", True), ("Llama", False)])
def test_each_attention_call_takes_its_rotary(kind, qk_norm, tmp_path):
    gm, context = _graph(kind, tmp_path)
    counts = op_counts(gm)
    assert counts[FUSED] == 0 and counts[ROTARY] == 0 and counts[ATTN] == LAYERS
    calls = [n for n in gm.graph.nodes if str(n.target) == ATTN]
    assert all(len(n.args) == (14 if qk_norm else 7) for n in calls)
    assert all(n.args[7] is True for n in calls) if qk_norm else True
    assert context.report.fusions["attention_rope"] == LAYERS
    if qk_norm:  # the q/k norms and their fusion stay counted
        assert context.report.fusions["qk_norm_rotary"] == LAYERS


def test_switched_off_leaves_the_rotary_op(tmp_path):
    gm, context = _graph("Qwen3", tmp_path, CompilerConfig(fuse_attention_rope=False))
    counts = op_counts(gm)
    assert counts[FUSED] == LAYERS and "attention_rope" not in context.report.fusions
    assert all(len(n.args) == 5 for n in gm.graph.nodes if str(n.target) == ATTN)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["Qwen3", "Llama"])
def test_compiled_numbers_equal_eager_with_and_without(kind, device, tmp_path):
    model = our_model(kind, tmp_path, device)
    ids, positions, metadata = prefill(device)
    caches = [m.kv_cache for m in model.modules() if hasattr(m, "kv_cache")]
    outs = []
    for options in ({}, {"fuse_attention_rope": False}, None):
        for c in caches:
            c.zero_()
        with forward_context(metadata), torch.inference_mode():
            fn = model.forward if options is None else torch.compile(
                model.forward, backend="infer", options=dict(options, inner_compiler="eager"))
            outs.append((fn(ids, positions), [c.clone() for c in caches]))
        torch._dynamo.reset()
    (fused, fused_caches), (separate, separate_caches), (eager, eager_caches) = outs
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(fused, separate, rtol=0, atol=0)  # the same ops on the CPU/prefill path
    torch.testing.assert_close(fused, eager, atol=tol, rtol=tol)
    for a, b in zip(fused_caches, eager_caches):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_a_rotary_output_with_another_user_is_left_alone():
    """q after its rotary also feeds something else: the rotary must stay in the graph."""
    from infer.runtime.attention import AttentionMetadata
    infer = torch.ops.infer
    md = AttentionMetadata.build([3], [3], [[0]], 4)
    cache = torch.zeros(2, 4, 4, 2, 16)

    def fn(q, k, v, cos, sin):
        qr, kr = infer.rotary_embedding(q, k, cos, sin)
        out = infer.paged_attention(qr.flatten(1), kr.flatten(1), v, cache, 0.25)
        return out + qr.flatten(1)

    args = (torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 32), torch.randn(3, 8), torch.randn(3, 8))
    with forward_context(md), torch.no_grad():
        gm = make_fx(fn)(*args)
        context = context_for(gm)
        PassManager(CompilerConfig(), context)(gm.graph)
    assert op_counts(gm)[ROTARY] == 1
    assert all(len(n.args) == 5 for n in gm.graph.nodes if str(n.target) == ATTN)


def test_bad_rope_arguments_name_the_problem():
    from infer.runtime.attention import AttentionMetadata
    md = AttentionMetadata.build([3], [3], [[0]], 4)
    cache = torch.zeros(2, 4, 4, 2, 16)
    q, k, v = torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32)
    with forward_context(md), pytest.raises(ValueError, match="cos and sin must both be"):
        torch.ops.infer.paged_attention(q, k, v, cache, 0.25, torch.randn(3, 8), None)
    with forward_context(md), pytest.raises(ValueError, match="qk_norm=True needs cos and sin"):
        torch.ops.infer.paged_attention(q, k, v, cache, 0.25, None, None, True)
