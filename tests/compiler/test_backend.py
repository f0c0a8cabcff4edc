"""Backend registration, options, grad mode, dynamic shapes and the compile report."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import infer.compiler as ic
from tiny_hf import logits_of, tiny_model


def test_entry_point_registers_backend_without_importing_infer():
    code = textwrap.dedent("""
        import sys, torch
        assert "infer" not in sys.modules
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="infer",
                          options={"inner_compiler": "eager"})
        x = torch.randn(5)
        with torch.no_grad():
            torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
        assert "infer" in sys.modules
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("options, words", [
    ({"inner_compilr": "eager"}, ["inner_compilr", "accepted", "inner_compiler"]),
    ({"inner_compiler": "tvm"}, ["'tvm'", "inductor", "eager"]),
    ({"fuse_norm": "yes"}, ["fuse_norm", "'yes'"]),
    ({"cudagraph_capture_sizes": [0, 4]}, ["cudagraph_capture_sizes", "positive"]),
])
def test_bad_options_are_value_errors_that_name_the_value(options, words):
    model = _mlp()
    with torch.no_grad(), pytest.raises(ValueError) as info:
        torch.compile(model, backend="infer", options=options)(torch.randn(2, 16))
    for word in words:
        assert word in str(info.value)


def test_mode_is_rejected():
    with torch.no_grad(), pytest.raises(ValueError, match="no mode"):
        torch.compile(_mlp(), backend="infer", mode="max-autotune")(torch.randn(2, 16))


def test_grad_mode_with_trainable_parameters_says_to_use_inference_mode():
    with pytest.raises(ValueError, match="inference_mode"):
        torch.compile(_mlp(), backend="infer")(torch.randn(2, 16))


def test_frozen_parameters_compile_with_grad_enabled():
    model = _mlp().requires_grad_(False)
    x = torch.randn(3, 16)
    out = torch.compile(model, backend="infer", options={"inner_compiler": "eager"})(x)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_dynamic_batch_compiles_once(inner):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="infer", options={"inner_compiler": inner})
    before = ic.compilation_count()
    with torch.inference_mode():
        for batch in (2, 3, 5):
            ids = torch.randint(0, 128, (batch, 6))
            torch._dynamo.mark_dynamic(ids, 0)
            torch.testing.assert_close(logits_of(compiled, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)
    assert ic.compilation_count() - before == 1


def test_report_fields_are_filled_and_consistent():
    model = tiny_model("llama")
    with torch.inference_mode():
        logits_of(torch.compile(model, backend="infer", options={"inner_compiler": "eager"}),
                  torch.randint(0, 128, (1, 5)))
    report = ic.last_report()
    assert report.inner_compiler == "eager"
    assert report.pieces == 1
    assert set(report.passes) >= {"noop_elimination"}
    assert report.passes["noop_elimination"] > 0  # HF's attention reshapes include identity views
    assert report.nodes_before - report.nodes_after >= report.passes["noop_elimination"] > 0
    assert report.time_dynamo_s is not None and report.time_dynamo_s > 0
    assert report.time_passes_s > 0 and report.time_inner_s >= 0
    assert "noop_elimination" in report.summary()


def test_dump_graphs_logs_before_and_after_each_pass(caplog):
    with caplog.at_level(logging.DEBUG, logger="infer"), torch.no_grad():
        torch.compile(_mlp(), backend="infer", options={"inner_compiler": "eager", "dump_graphs": True})(
            torch.randn(2, 16))
    text = caplog.text
    assert "graph before noop_elimination" in text and "graph after noop_elimination" in text


def test_no_dump_by_default(caplog):
    with caplog.at_level(logging.DEBUG, logger="infer"), torch.no_grad():
        torch.compile(_mlp(), backend="infer", options={"inner_compiler": "eager"})(torch.randn(2, 16))
    assert "graph before" not in caplog.text


class _Block(torch.nn.Module):
    """Three projections of one input (gemm_pack packs them), after a graph break: Dynamo runs
    one resumed-frame graph for every block, each passing its own weights."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.relu(self.q(x) + self.k(x) * self.v(x))


class _Stack(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _stack_and_input(device: str):
    torch.manual_seed(0)
    model = _Stack().to(device).requires_grad_(False)
    return model, torch.randn(4, 16, device=device)


def test_one_graph_for_several_modules_packs_each_modules_weights():
    """After a graph break every block runs the same compiled graph with its own weights: each
    block must get a weight pack of its own weights (not the first block's)."""
    model, x = _stack_and_input("cpu")
    with torch.inference_mode():
        expected = model(x)
        got = torch.compile(model, backend="infer", options={"inner_compiler": "eager"})(x)
    assert ic.last_report().fusions.get("pack(q,k,v)", 0) >= 1  # the blocks' graph packs q/k/v
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for block in model.blocks:  # each block's weights are views of its own pack now
        assert block.k.weight.data_ptr() == block.q.weight.data_ptr() + block.q.weight.numel() * 4


@pytest.mark.gpu
def test_one_graph_for_several_modules_does_not_replay_other_weights():
    """Piecewise CUDA graphs of such a shared graph are captured with one block's weights; the
    other blocks must not replay them (they run uncaptured)."""
    model, x = _stack_and_input("cuda")
    options = {"inner_compiler": "eager", "cudagraph_mode": "piecewise", "cudagraph_capture_sizes": (4,)}
    compiled = torch.compile(model, backend="infer", options=options)
    with torch.inference_mode():
        expected = model(x)
        for _ in range(3):  # warm-up, capture, replay
            torch._dynamo.mark_dynamic(x, 0)
            got = compiled(x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_max_pool_compiles_in_a_fresh_process(inner):
    """A model with nn.MaxPool2d compiles as the first thing a process does (Inductor's
    decompositions read Inductor's lowerings, which nothing else has imported yet)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import torch
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2)).eval()
        x = torch.randn(2, 3, 9, 9)
        with torch.inference_mode():
            out = torch.compile(m, backend="infer", options={{"inner_compiler": "{inner}"}})(x)
            torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
