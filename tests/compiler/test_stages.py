"""Stage-by-stage compilation: one graph for every decoder layer, the same numbers as eager, and
a compile cache entry a later process loads without Dynamo."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import infer.compiler as ic
from infer.compiler import cache
from infer.compiler.report import REPORTS
from infer.compiler.stages import (UNFUSED_STAGES, CachedStage, CompiledStage, DirectStage, PlainStage,
                                   compile_stages, direct_stages, lookup_stages, store_stages)
from infer.runtime.attention import forward_context
sys.path.insert(0, str(Path(__file__).parent))
from test_cache import EAGER, _caches, _model, _steps  # noqa: E402

LAYERS = 3


def _call(model, stages, step):
    ids, pos, md = step
    ids, pos = ids.clone(), pos.clone()
    with forward_context(md), torch.inference_mode():
        return model.run_stages(ids, pos, stages).clone()


def _eager(model):
    out = []
    for ids, pos, md in _steps():
        with forward_context(md), torch.inference_mode():
            out.append(model(ids.clone(), pos.clone()))
    return out


@pytest.mark.parametrize("dtype, inner", [(torch.float32, "eager"), (torch.bfloat16, "eager"),
                                          (torch.float32, "inductor")], ids=["fp32", "bf16", "inductor"])
def test_one_graph_serves_every_layer_and_matches_eager(dtype, inner):
    model = _model(dtype, layers=LAYERS)
    reference = copy.deepcopy(model)
    expected = _eager(reference)
    frames = REPORTS.frames_compiled()
    stages = compile_stages(model.stages, dict(EAGER, inner_compiler=inner))
    actual = [_call(model, stages, step) for step in _steps()]
    assert REPORTS.frames_compiled() - frames == 3  # prepare, one layer graph, finish: never per layer
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)
    for a, e in zip(_caches(model), _caches(reference)):  # every layer wrote its own KV cache
        torch.testing.assert_close(a, e, **tol)


def test_the_layer_graph_holds_every_fusion_of_a_whole_model():
    model = _model(layers=LAYERS)
    stages = compile_stages(model.stages, EAGER)
    layer = model.model.layers[0]
    hidden = torch.randn(5, 64)
    cos_sin = model.model.rotary_emb.cos_sin(torch.arange(5))
    from infer.runtime.attention import AttentionMetadata
    md = AttentionMetadata.build([5], [5], [[0, 1]], 4)
    with forward_context(md), torch.inference_mode():
        stages.layer(layer, hidden, torch.zeros_like(hidden), cos_sin)
    report = ic.last_report()
    assert report.fusions == {"pack(q,k,v)": 1, "pack(gate,up)": 1, "fused_add_rms_norm": 2, "linear_prologue": 3,
                              "rms_norm": 2, "qk_norm_rotary": 1, "silu_and_mul": 1}
    assert report.split_ops == {"infer::paged_attention": 1}


def test_piecewise_cuda_graphs_are_refused():
    model = _model()
    with pytest.raises(ic.InferUsageError, match="cudagraph_mode='none'.*'piecewise'"):
        compile_stages(model.stages, dict(EAGER, cudagraph_mode="piecewise"))


def _cold(tmp_path, model, options=EAGER):
    key = cache.cache_key(model, options, extra="staged")
    assert lookup_stages(tmp_path, key, model.stages) is None
    stages = compile_stages(model.stages, options)
    first, *rest = _steps()
    with cache.recording() as rec:
        outs = [_call(model, stages, first)]
    path = store_stages(tmp_path, key, rec, stages)
    return outs + [_call(model, stages, step) for step in rest], key, path


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_warm_stages_equal_cold_without_dynamo(tmp_path, inner):
    cold_model = _model(layers=LAYERS)
    cold, key, path = _cold(tmp_path, cold_model, dict(EAGER, inner_compiler=inner))
    assert path is not None and path.is_file()
    torch._dynamo.reset()
    warm_model = _model(layers=LAYERS)
    frames = REPORTS.frames_compiled()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    stages = lookup_stages(tmp_path, key, warm_model.stages)
    assert all(isinstance(s, CachedStage) for s in stages)
    warm = [_call(warm_model, stages, step) for step in _steps()]
    assert REPORTS.frames_compiled() == frames  # Dynamo never ran
    if inner == "inductor":  # the cold compile filled Inductor's FX graph cache for exactly these pieces
        assert counters["inductor"]["fxgraph_cache_hit"] - hits == 1 + 2 + 1  # prepare, layer (2 pieces), finish
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_caches(warm_model), _caches(cold_model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for layer in warm_model.model.layers:  # each layer's q/k/v became views of its own pack
        attn = layer.self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    assert len({layer.self_attn.q_proj.weight.data_ptr() for layer in warm_model.model.layers}) == LAYERS


def test_warm_stage_checks_arguments(tmp_path):
    _, key, _ = _cold(tmp_path, _model(layers=LAYERS))
    model = _model(layers=LAYERS)
    stages = lookup_stages(tmp_path, key, model.stages)
    ids, pos, md = _steps()[0]
    with forward_context(md), torch.inference_mode():
        with pytest.raises(ValueError, match="input_ids"):
            stages.prepare(model.model, ids.int(), pos)
        with pytest.raises(TypeError, match="takes 3 arguments"):
            stages.layer(model.model.layers[0], torch.zeros(12, 64))


def test_a_stage_that_breaks_its_graph_is_not_stored(tmp_path, caplog):
    model = _model(layers=LAYERS)
    stages = model.stages

    def finish(self, hidden, residual):
        out = self.norm(hidden + residual)
        torch._dynamo.graph_break()
        return out * 1
    options = EAGER
    compiled = type(stages)(*(CompiledStage(n, f, options) for n, f in zip(stages._fields, stages._replace(finish=finish))))
    with cache.recording() as rec:
        _call(model, compiled, _steps()[0])
    with caplog.at_level("WARNING", logger="infer"):
        assert store_stages(tmp_path, "0" * 64, rec, compiled) is None
    assert any("not storing" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.iterdir())


def test_direct_stages_skip_guards_and_equal_the_dynamo_path():
    model = _model(layers=LAYERS)
    stages = compile_stages(model.stages, EAGER)
    first, *rest = _steps()
    with cache.recording() as rec:
        _call(model, stages, first)
    direct = direct_stages(rec, stages)
    assert all(isinstance(s, DirectStage) for s in direct)
    frames = REPORTS.frames_compiled()
    for step in rest:
        via_dynamo = _call(model, stages, step)
        torch.testing.assert_close(_call(model, direct, step), via_dynamo, rtol=0, atol=0)
    assert REPORTS.frames_compiled() == frames
    assert len(direct.layer._bound) == LAYERS  # each layer's weights fed from its own module
    ids, pos, md = first
    with forward_context(md), torch.inference_mode(), pytest.raises(ValueError, match="input_ids"):
        direct.prepare(model.model, ids.float(), pos)


def test_no_direct_stages_without_one_graph_per_stage():
    model = _model(layers=LAYERS)
    stages = compile_stages(model.stages, EAGER)
    with cache.recording() as rec:
        _call(model, stages._replace(finish=model.stages.finish), _steps()[0])  # finish ran eager
    assert direct_stages(rec, stages) is None


def test_the_prepare_stage_has_nothing_to_fuse():
    model = _model(layers=LAYERS)
    stages = compile_stages(model.stages, EAGER)
    ids, pos, md = _steps()[0]
    with forward_context(md), torch.inference_mode():
        stages.prepare(model.model, ids.clone(), pos.clone())
    report = ic.last_report()
    assert report.fusions == {} and not any(report.passes.values())
    assert UNFUSED_STAGES == ("prepare",)


def test_plain_stages_run_uncompiled_and_round_trip_the_cache(tmp_path, caplog):
    model = _model(layers=LAYERS)
    reference = copy.deepcopy(model)
    expected = _eager(reference)
    frames = REPORTS.frames_compiled()
    stages = compile_stages(model.stages, EAGER, plain=UNFUSED_STAGES)
    assert isinstance(stages.prepare, PlainStage) and isinstance(stages.layer, CompiledStage)
    key = cache.cache_key(model, EAGER, extra="staged plain")
    first, *rest = _steps()
    with cache.recording() as rec:
        cold = [_call(model, stages, first)]
    cold += [_call(model, stages, step) for step in rest]
    assert REPORTS.frames_compiled() - frames == 2  # the layer graph and finish; prepare ran as written
    for a, e in zip(cold, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)

    direct = direct_stages(rec, stages)
    assert isinstance(direct.prepare, PlainStage) and isinstance(direct.layer, DirectStage)
    assert direct_stages(rec, compile_stages(model.stages, EAGER)) is None  # a compiled prepare: no graph
    path = store_stages(tmp_path, key, rec, stages)
    assert path is not None and path.is_file()

    torch._dynamo.reset()
    warm_model = _model(layers=LAYERS)
    frames = REPORTS.frames_compiled()
    loaded = lookup_stages(tmp_path, key, warm_model.stages)
    assert isinstance(loaded.prepare, PlainStage)
    assert isinstance(loaded.layer, CachedStage) and isinstance(loaded.finish, CachedStage)
    warm = [_call(warm_model, loaded, step) for step in _steps()]
    assert REPORTS.frames_compiled() == frames  # Dynamo never ran
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_stage_names_and_uncompiled_stage_lists_are_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"unknown stages \['embed'\].*'prepare', 'layer', 'finish'"):
        compile_stages(model.stages, EAGER, plain=("embed",))
    with pytest.raises(TypeError, match="stage 'prepare': expected a CompiledStage or PlainStage"):
        store_stages("unused", "0" * 64, cache.Recording(), model.stages)  # plain functions, not compile_stages' output
