"""The compile cache: a warm load equals the cold compile, misses on any change, survives bad files."""
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch._dynamo.decorators import mark_unbacked

import infer.compiler as ic
from infer.compiler import cache
from infer.compiler.report import REPORTS
from infer.models.qwen import Qwen3ForCausalLM
from infer.runtime.attention import Attention, AttentionMetadata, forward_context

BLOCK = 4
EAGER = {"inner_compiler": "eager", "cudagraph_mode": "none"}


def _model(dtype=torch.float32, layers=2, eps=1e-6, blocks=32):
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=eps,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.zeros(2, blocks, BLOCK, m.num_kv_heads, m.head_dim, dtype=dtype))
    return model


def _steps():
    """A prefill of two prompts (7 and 5 tokens), a decode step of both, then one of the first alone."""
    tables = [[3, 9, 1, 7], [5, 2, 8, 0]]
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(0))
    return [(ids, torch.tensor(list(range(7)) + list(range(5))), AttentionMetadata.build([7, 5], [7, 5], tables, BLOCK)),
            (ids[:2] + 1, torch.tensor([7, 5]), AttentionMetadata.build([1, 1], [8, 6], tables, BLOCK)),
            (ids[:1] + 2, torch.tensor([8]), AttentionMetadata.build([1], [9], tables[:1], BLOCK))]


def _call(forward, step):
    """One step as ModelRunner.forward runs it: dim 0 unbacked, inside the forward context."""
    ids, pos, md = step
    ids, pos = ids.clone(), pos.clone()
    mark_unbacked(ids, 0)
    mark_unbacked(pos, 0)
    with forward_context(md), torch.inference_mode():
        return forward(ids, pos).clone()


def _run(forward):
    return [_call(forward, step) for step in _steps()]


def _cold(tmp_path, model, options=EAGER):
    """Compile (recording the first call), store, run the other steps; returns (outputs, key, path)."""
    key = cache.cache_key(model, options)
    assert cache.lookup(tmp_path, key, model) is None
    compiled = torch.compile(model.forward, backend="infer", options=options)
    first, *rest = _steps()
    with cache.recording() as rec:
        outs = [_call(compiled, first)]
    path = cache.store(tmp_path, key, rec, model.forward, outs[0])
    outs += [_call(compiled, step) for step in rest]
    return outs, key, path


def _caches(model):
    return [m.kv_cache for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", [EAGER, dict(EAGER, splitting_ops=()), dict(EAGER, fuse_gemm=False),
                                     dict(EAGER, inner_compiler="inductor")],
                         ids=["split", "whole", "nogemm", "inductor"])
def test_warm_load_equals_cold_compile_without_dynamo(tmp_path, dtype, options):
    cold_model = _model(dtype)
    cold, key, path = _cold(tmp_path, cold_model, options)
    assert path is not None and path.is_file()
    cold_report = ic.last_report()
    torch._dynamo.reset()

    warm_model = _model(dtype)
    frames = REPORTS.frames_compiled()
    forward = cache.lookup(tmp_path, key, warm_model)
    assert forward is not None
    warm = _run(forward)
    assert REPORTS.frames_compiled() == frames  # Dynamo never ran
    report = ic.last_report()
    assert report.cached and report.pieces == cold_report.pieces and report.fusions == cold_report.fusions
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_caches(warm_model), _caches(cold_model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if options.get("fuse_gemm", True):  # packed q/k/v weights: the module's weights are views again
        q = warm_model.model.layers[0].self_attn.q_proj.weight
        k = warm_model.model.layers[0].self_attn.k_proj.weight
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


@pytest.mark.parametrize("inner, round_trips", [("eager", 0), ("inductor", 1)])
def test_only_inductor_compiles_the_reloaded_copy_of_a_cached_graph(tmp_path, monkeypatch, inner, round_trips):
    """A graph being cached is compiled from its saved-and-reloaded copy only for Inductor, whose
    FX graph cache a warm load then hits; the eager inner compiler has no such cache."""
    from infer.compiler import pipeline
    calls = []
    real = pipeline.same_as_reloaded
    monkeypatch.setattr(pipeline, "same_as_reloaded", lambda *a: calls.append(a) or real(*a))
    model = _model(layers=1)
    reference = _run(_model(layers=1))
    cold, _, path = _cold(tmp_path, model, dict(EAGER, inner_compiler=inner))
    assert path is not None and len(calls) == round_trips
    for a, b in zip(cold, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_warm_load_sees_weight_updates_and_checks_arguments(tmp_path):
    model = _model()
    _, key, _ = _cold(tmp_path, model)
    torch._dynamo.reset()
    warm_model, reference = _model(), _model()
    forward = cache.lookup(tmp_path, key, warm_model)
    with torch.no_grad():  # in-place, as load_state_dict does: reaches the packed GEMM too
        for m in (warm_model, reference):
            m.model.layers[1].self_attn.k_proj.weight.mul_(2)
            m.model.layers[0].mlp.down_proj.weight.add_(0.5)
    expected = _run(reference.forward)
    for a, b in zip(_run(forward), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ids, pos, md = _steps()[0]
    with forward_context(md), torch.inference_mode(), pytest.raises(ValueError, match="input_ids"):
        forward(ids.int(), pos)
    with forward_context(md), torch.inference_mode(), pytest.raises(ValueError, match="positions"):
        forward(ids, pos[None])


def test_a_fresh_process_loads_without_compiling(tmp_path):
    model = _model()
    cold, key, _ = _cold(tmp_path, model)
    torch.save(cold, tmp_path / "cold.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_cache import _model, _run
        from infer.compiler import cache
        from infer.compiler.report import REPORTS
        model = _model()
        forward = cache.lookup({str(tmp_path)!r}, cache.cache_key(model, {EAGER!r}), model)
        assert forward is not None
        outs = _run(forward)
        assert REPORTS.frames_compiled() == 0, "Dynamo ran"
        for a, b in zip(outs, torch.load({str(tmp_path / 'cold.pt')!r})):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


@pytest.mark.parametrize("change", ["eps", "layers", "kv_blocks", "dtype", "options", "extra"])
def test_any_change_misses(tmp_path, change):
    model = _model()
    _, key, _ = _cold(tmp_path, model)
    changed = {"eps": lambda: _model(eps=1e-5), "layers": lambda: _model(layers=3),
               "kv_blocks": lambda: _model(blocks=16), "dtype": lambda: _model(torch.bfloat16)}
    other = changed.get(change, _model)()
    options = dict(EAGER, fuse_norm=False) if change == "options" else EAGER
    new_key = cache.cache_key(other, options, extra="tp 1/2" if change == "extra" else "")
    assert new_key != key
    assert cache.lookup(tmp_path, new_key, other) is None
    assert cache.lookup(tmp_path, cache.cache_key(_model(), EAGER), _model()) is not None  # the entry is fine


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "graph", "shape"])
def test_a_bad_entry_is_ignored_with_a_warning(tmp_path, caplog, damage):
    model = _model()
    _, key, path = _cold(tmp_path, model)
    text = path.read_text()
    data = json.loads(text)
    if damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "other_key":
        path.write_text(json.dumps(dict(data, key="0" * 64)))
    elif damage == "graph":  # an op that does not exist
        node = next(n for n in data["graph"] if n["op"] == "call_function" and "op" in n["target"])
        node["target"]["op"] = "aten::no_such_op"
        path.write_text(json.dumps(data))
    else:  # the entry was made for another KV-cache size than the module now has
        entry = next(b for b in data["inputs"] if b.get("name") == "kv_cache")
        entry["shape"][1] += 1
        path.write_text(json.dumps(data))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="infer"):
        assert cache.lookup(tmp_path, key, _model()) is None
    assert any("ignoring" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


class _Breaks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.linear(x)
        torch._dynamo.graph_break()
        return self.linear(y)


def test_a_graph_break_is_not_stored(tmp_path, caplog):
    model = _Breaks().requires_grad_(False)
    key = cache.cache_key(model, EAGER)
    compiled = torch.compile(model.forward, backend="infer", options=EAGER)
    x = torch.randn(3, 8)
    mark_unbacked(x, 0)
    with cache.recording() as rec, torch.inference_mode():
        out = compiled(x)
    with caplog.at_level(logging.WARNING, logger="infer"):
        assert cache.store(tmp_path, key, rec, model.forward, out) is None
    assert "broke the graph" in caplog.text
    assert not list(tmp_path.iterdir())


def test_backed_dynamic_sizes_are_not_stored(tmp_path, caplog):
    """`mark_dynamic` sizes come with guards (0/1 specialization) that a cached graph would skip."""
    model = _model()
    key = cache.cache_key(model, EAGER)
    compiled = torch.compile(model.forward, backend="infer", options=EAGER)
    ids, pos, md = _steps()[0]
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(pos, 0)
    with cache.recording() as rec, forward_context(md), torch.inference_mode():
        out = compiled(ids, pos)
    with caplog.at_level(logging.WARNING, logger="infer"):
        assert cache.store(tmp_path, key, rec, model.forward, out) is None
    assert "backed" in caplog.text


def test_a_static_graph_runs_only_its_own_sizes(tmp_path):
    model = _model()
    key = cache.cache_key(model, EAGER)
    compiled = torch.compile(model.forward, backend="infer", options=EAGER)
    ids, pos, md = _steps()[0]
    with cache.recording() as rec, forward_context(md), torch.inference_mode():
        out = compiled(ids, pos)
    assert cache.store(tmp_path, key, rec, model.forward, out) is not None
    torch._dynamo.reset()
    warm_model = _model()
    forward = cache.lookup(tmp_path, key, warm_model)
    with forward_context(md), torch.inference_mode():
        torch.testing.assert_close(forward(ids, pos), out, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"\[12\]"):
            forward(ids[:5], pos[:5])
