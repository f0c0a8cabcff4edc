"""CPU smoke tests of the benchmark harness (``python -m infer.benchmarks ... --tiny``)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from infer.benchmarks import floor, hf_baselines, throughput
from infer.benchmarks.__main__ import SCENARIOS, main
from infer.benchmarks.decode_step import build, floor_bytes, qwen3_config
from infer.benchmarks.harness import Column, Table, device_name, measure, write_rows
from infer.models.qwen import Qwen3ForCausalLM

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
EXPECTED_COLUMNS = {
    "floor": {"shape", "batch", "context", "floor_ms", "gemm_ms"},
    "decode": {"shape", "mode", "batch", "context", "ms", "tok_s", "gbps", "floor_ms", "x_floor"},
    "throughput": {"mode", "output_tokens", "seconds", "tok_s", "roofline_tok_s"},
    "startup": {"mode", "phase", "ttft_s", "load_s", "dynamo_s", "passes_s", "inner_s", "capture_s"},
    "kernels": {"kernel", "case", "gbps"},
    "cpu": {"dtype", "batch", "engine_tok_s", "hf_tok_s", "ratio", "floor_tok_s"},
}


def _rows(payload: dict, **match) -> list[dict]:
    return [r for r in payload["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_all_tiny_writes_every_scenario(tmp_path, capsys):
    assert main(["all", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--tmp", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    payloads = {}
    for name in SCENARIOS:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        payloads[name] = payload
        assert payload["partial"] is False and payload["device"].startswith("cpu") and payload["date"]
        assert EXPECTED_COLUMNS[name] <= set(payload["columns"]), name
        assert payload["rows"] and all("status" in r for r in payload["rows"])
        markdown = (tmp_path / f"{name}.md").read_text()
        assert payload["title"] in markdown and "| status |" in markdown and payload["device"] in markdown
        if HAVE_MATPLOTLIB:
            assert (tmp_path / f"{name}.png").stat().st_size > 0
        else:
            assert any(n.startswith("no plot") for n in payload["notes"])
        assert payload["title"] in printed
    assert all(p["title"] in (tmp_path / "README_table.md").read_text() for p in payloads.values())

    decode = payloads["decode"]
    assert len(decode["rows"]) == 2 * 5  # batches {1, 4} x context {16} x five modes
    for mode in ("full-eager", "hf-eager"):
        for row in _rows(decode, mode=mode):
            assert row["status"] == "ok" and row["ms"] > 0 and row["x_floor"] > 0, row
    assert all(r["status"].startswith("skipped") for r in _rows(decode, mode="hf-static-compiled"))

    assert [r["batch"] for r in payloads["floor"]["rows"]] == [1, 4]
    assert all(r["status"] == "ok" and r["gemm_ms"] > 0 for r in payloads["floor"]["rows"])

    (row,) = _rows(payloads["throughput"], mode="eager")
    assert row["status"] == "ok"
    assert row["output_tokens"] == payloads["throughput"]["meta"]["requested_output_tokens"]

    for phase in ("cold", "warm"):
        (row,) = _rows(payloads["startup"], mode="eager", phase=phase)
        assert row["status"] == "ok" and row["ttft_s"] > 0 and row["load_s"] > 0, row
    assert all(r["status"].startswith("skipped") for r in payloads["kernels"]["rows"])

    cpu = payloads["cpu"]
    assert [(r["dtype"], r["batch"]) for r in cpu["rows"]] == [("float32", 1), ("float32", 2)]
    for row in cpu["rows"]:
        assert row["status"] == "ok" and row["engine_tok_s"] > 0 and row["hf_tok_s"] > 0, row
        assert row["ratio"] == pytest.approx(row["engine_tok_s"] / row["hf_tok_s"])  # one round: the same
        low, high = map(float, row["ratio_range"].split("-"))
        assert low - 0.01 <= row["ratio"] <= high + 0.01  # the range is printed to 2 decimals
        assert 0 < row["of_floor"] < 1.5  # a measured floor, not a made-up one
    assert cpu["meta"]["cores"] >= 1 and cpu["meta"]["read_gbps"] > 0


def test_startup_measures_a_baseline_tree_alongside(tmp_path):
    import shutil
    from pathlib import Path

    import infer
    here = Path(infer.__file__).resolve().parent
    base = tmp_path / "base"
    shutil.copytree(here, base, ignore=shutil.ignore_patterns(".git", "scratch", "results", "__pycache__", "*.egg-info"))
    out = tmp_path / "out"
    assert main(["startup", "--tiny", "--device", "cpu", "--llm-modes", "eager", "--baseline", str(base),
                 "--out", str(out), "--tmp", str(tmp_path)]) == 0
    payload = json.loads((out / "startup.json").read_text())
    for code, tree in (("this", here), ("baseline", base)):
        for phase in ("cold", "warm"):
            (row,) = _rows(payload, mode="eager", code=code, phase=phase)
            assert row["status"] == "ok" and row["ttft_s"] > 0, row
            assert row["infer_tree"] == str(tree)  # the child imported that checkout
    with pytest.raises(SystemExit, match="is not an infer tree"):
        main(["startup", "--tiny", "--device", "cpu", "--baseline", str(tmp_path), "--out", str(out)])


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--context", "-5"), ("--steps", "0")])
def test_sizes_below_one_are_refused_by_name(flag, value):
    from infer.benchmarks.__main__ import parse_args, settings_for

    with pytest.raises(SystemExit, match=f"{flag} takes positive integers, got {value}"):
        settings_for(parse_args(["decode", "--tiny", "--device", "cpu", flag, value]), "decode")


def test_tmp_folder_is_created_and_a_file_there_is_refused(tmp_path):
    from infer.benchmarks.__main__ import parse_args, settings_for

    missing = tmp_path / "a" / "b"
    settings = settings_for(parse_args(["floor", "--tiny", "--device", "cpu", "--tmp", str(missing)]), "floor")
    assert settings.tmp_dir == str(missing) and missing.is_dir()
    clash = tmp_path / "file"
    clash.write_text("")
    with pytest.raises(SystemExit, match="is not a folder"):
        settings_for(parse_args(["floor", "--tiny", "--device", "cpu", "--tmp", str(clash)]), "floor")


@pytest.mark.parametrize("shape", ["tiny", "0.6b", "8b"])
def test_floor_bytes_match_the_model(shape):
    cfg = qwen3_config(shape)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    for batch, context in [(1, 512), (64, 2048)]:
        assert floor.floor_bytes(cfg, batch, context) == floor_bytes(model, cfg, batch, context)


def test_measure_records_failures_and_keeps_going(tmp_path):
    table = Table("demo", "Demo", [Column("x", "x"), Column("ms", "ms", ".2f")], "cpu", tmp_path)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    def broken():
        raise ValueError("bad | value")

    measure(table, dict(x=1), lambda: dict(ms=1.5))
    measure(table, dict(x=2), oom)
    measure(table, dict(x=3), broken)
    assert [r["status"] for r in table.rows] == ["ok", "oom", "error: ValueError: bad | value"]
    text = table.finish()
    assert "| 1 | 1.50 | ok |" in text and "| 2 | n/a | oom |" in text and "bad / value" in text
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["rows"][2]["status"] == "error: ValueError: bad | value"


def test_schedule_simulation_counts_every_decode_step():
    # two sequences admitted together; the prefill samples each one's first token
    assert throughput.simulate_decode([10, 20], [3, 2], max_num_seqs=8) == [(2, 11 + 21), (1, 12)]
    # one at a time: the second waits for the first to finish
    assert throughput.simulate_decode([10, 20], [3, 2], max_num_seqs=1) == [(1, 11), (1, 12), (1, 21)]
    prompts, outputs = throughput.NANO_VLLM.sample(151936)
    assert len(prompts) == 256 and all(100 <= len(p) <= 1024 for p in prompts)
    assert all(100 <= n <= 1024 for n in outputs) and max(max(p) for p in prompts) <= 10000
    assert throughput.NANO_VLLM.sample(151936) == (prompts, outputs)


@torch.inference_mode()
def test_hf_caches_return_to_the_context():
    model = hf_baselines.build_hf_model(qwen3_config("tiny"), "cpu")
    cache = hf_baselines.dynamic_cache(model.config, 2, 8, "cpu")
    kwargs = hf_baselines._step_kwargs(model, cache, 2, 8, "cpu")
    assert model(**kwargs).logits.shape == (2, 1, model.config.vocab_size)
    assert int(cache.get_seq_length()) == 9
    cache.crop(-1)
    assert int(cache.get_seq_length()) == 8
    static = hf_baselines.static_cache(model.config, 2, 8 + hf_baselines.STATIC_SLACK, "cpu")
    hf_baselines.set_length(static, 8)
    model(**hf_baselines._step_kwargs(model, static, 2, 8, "cpu"))
    hf_baselines.set_length(static, 8)
    assert int(static.get_seq_length()) == 8


def test_our_tiny_model_builds_without_kv():
    model, cfg = build("tiny", 0, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and cfg.vocab_size == 512


def test_append_keeps_earlier_rows_and_replaces_remeasured_ones(tmp_path):
    args = ["floor", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "1"]
    assert main(args + ["--batch", "1", "2"]) == 0
    assert main(args + ["--batch", "2", "3", "--append"]) == 0
    rows = json.loads((tmp_path / "floor.json").read_text())["rows"]
    assert sorted(r["batch"] for r in rows) == [1, 2, 3]
    assert main(args + ["--batch", "5"]) == 0  # without --append the table starts over
    assert [r["batch"] for r in json.loads((tmp_path / "floor.json").read_text())["rows"]] == [5]
    (tmp_path / "floor.md").unlink()
    (tmp_path / "README_table.md").unlink()
    assert main(["tables", "--out", str(tmp_path)]) == 0  # markdown and README rebuilt from the JSON
    assert "| tiny | 5 | 16 |" in (tmp_path / "floor.md").read_text()
    assert "Decode floor" in (tmp_path / "README_table.md").read_text()


def test_static_compiled_falls_back_to_graph_breaks(monkeypatch):
    from infer.benchmarks import decode
    from infer.benchmarks.harness import Settings

    def fullgraph_fails(*args, **kwargs):
        raise RuntimeError("Unsupported: graph break in transformers")

    def with_breaks(model, batch, context, steps, device, fullgraph=True):
        assert fullgraph is False
        return 2.0, 0.5

    monkeypatch.setitem(decode.HF_MODES, "hf-static-compiled", fullgraph_fails)
    monkeypatch.setattr(hf_baselines, "time_hf_static_compiled", with_breaks)
    table = Table("decode", "Decode", decode.COLUMNS, "cpu")
    settings = Settings(device="cpu", out_dir=None, shapes=("tiny",), batches=(1,), contexts=(16,), steps=1)
    ms, startup, extra = decode._time_hf(table, "hf-static-compiled", None, 1, 16, settings)
    assert (ms, startup, extra["fullgraph"]) == (2.0, 0.5, False) and "graph break" in extra["fullgraph_error"]
    assert any("fullgraph=False" in n for n in table.notes)


def test_step_breakdown_skips_exactly_the_named_kernels_and_restores_them():
    """Every kind names kernels that exist (a rename would break the breakdown silently otherwise);
    inside the block they launch nothing, afterwards the real kernels are back; unknown kinds are
    refused by name."""
    import importlib

    from infer.benchmarks import step_breakdown as sb

    kernels = {(m, a): getattr(importlib.import_module(f"infer.runtime.kernels.{m}"), a)
               for spec in sb.KINDS.values() for m, a in spec}
    assert all(hasattr(k, "__getitem__") and not isinstance(k, sb._NoLaunch) for k in kernels.values())
    with sb.kernels_skipped(["rms_norm", "decode_attention"]):
        for (m, a), kernel in kernels.items():
            now = getattr(importlib.import_module(f"infer.runtime.kernels.{m}"), a)
            skipped = a in ("_rms_norm_kernel", "_decode_partial_kernel", "_decode_reduce_kernel")
            assert isinstance(now, sb._NoLaunch) == skipped, a
            if skipped:
                assert now[(1,)](1, 2, x=3) is None
    for (m, a), kernel in kernels.items():
        assert getattr(importlib.import_module(f"infer.runtime.kernels.{m}"), a) is kernel
    with pytest.raises(ValueError, match="'gemv'"):
        with sb.kernels_skipped(["gemv"]):
            pass


def test_write_rows_keeps_meta_and_rows_and_needs_a_path(tmp_path):
    write_rows(None, [{"a": 1}], copy_gbps=1.0)  # no path: nothing written, no error
    path = tmp_path / "out.json"
    write_rows(str(path), [{"a": 1}], copy_gbps=2.5)
    write_rows(str(path), [{"a": 1}, {"a": 2}], copy_gbps=2.5)  # rewritten after every row
    assert json.loads(path.read_text()) == dict(device=device_name("cuda"), copy_gbps=2.5, rows=[{"a": 1}, {"a": 2}])
    assert list(tmp_path.iterdir()) == [path]
