"""The CUDA-graph wrapper's policy on CPU: which calls capture, replay or run uncaptured, in each mode,
keyed by the graph's token count or by the step the runtime describes. A stand-in for CUDA's graphs
records the captured call and replays it into the same output tensors, as a CUDA graph does."""
from __future__ import annotations

import pytest
import torch

from infer.compiler.config import CompilerConfig
from infer.compiler.cudagraph import CudaGraphPool, CudaGraphs, CudaGraphWrapper, token_count_key
from infer.runtime import graphs
from infer.runtime.graphs import GraphStep, SplittingOp, graph_step


class _Graph:
    fn = outputs = None

    def replay(self):
        torch.utils._pytree.tree_map(lambda out, new: out.copy_(new), self.outputs, self.fn())


class ReplayingGraphs(CudaGraphs):
    """Graphs on the CPU: a capture runs the call once and keeps it; a replay runs it again into
    the captured outputs (reading the captured input buffers, like a CUDA graph)."""

    def __init__(self):
        self.captures = 0

    def new_graph(self):
        return _Graph()

    def capture(self, graph, pool, fn):
        self.captures += 1
        graph.fn, graph.outputs = fn, fn()
        return graph.outputs

    def is_capturing(self):
        return False

    def runs_on(self, args):
        return True

    def pool_handle(self):
        return object()

    def memory_allocated(self):
        return 0


class Counted:
    """``[x, w] -> [x @ w]``, boxed, counting its calls."""

    _boxed_call = True

    def __init__(self):
        self.calls = 0

    def __call__(self, args):
        self.calls += 1
        x, w = args
        return [x @ w]


def wrapper(mode="piecewise", splitting_ops=(), capture_keys=(1, 2, 4)):
    device = ReplayingGraphs()
    fn = Counted()
    wrapped = CudaGraphWrapper(fn, mode, CudaGraphPool(device_graphs=device), batch_key=token_count_key(0),
                               capture_keys=capture_keys, copy_indices=[0], static_indices=[1],
                               splitting_ops=splitting_ops)
    return wrapped, fn, device


W = torch.randn(3, 5)


def test_a_size_is_captured_at_its_second_call_and_replayed_after():
    wrapped, fn, device = wrapper()
    xs = [torch.randn(4, 3) for _ in range(4)]
    outs = [wrapped([x, W])[0].clone() for x in xs]
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, x @ W)
    assert device.captures == 1 and set(wrapped.graphs) == {4}
    assert fn.calls == 1 + 1 + 3  # warm-up, capture, then three replays (the stand-in replays by calling)
    wrapped([torch.randn(3, 3), W])  # 3 is not a capture size: run uncaptured, every time
    wrapped([torch.randn(3, 3), W])
    assert set(wrapped.graphs) == {4}


def test_a_moved_weight_runs_uncaptured_rather_than_replaying_the_captured_one():
    wrapped, fn, device = wrapper()
    x = torch.randn(2, 3)
    wrapped([x, W]), wrapped([x, W])
    other = torch.randn(3, 5)
    torch.testing.assert_close(wrapped([x, other])[0], x @ other)
    assert wrapped.warned_other_weights


def test_the_runtime_s_graph_step_decides_mode_and_key():
    wrapped, fn, device = wrapper(capture_keys=(8,))
    x = torch.randn(2, 3)
    with graph_step(GraphStep("none")):
        for _ in range(3):
            wrapped([x, W])
    assert device.captures == 0
    with graph_step(GraphStep("piecewise", 8)):  # the runtime pads to 8 and keys the step so
        for _ in range(3):
            torch.testing.assert_close(wrapped([x, W])[0], x @ W)
    assert set(wrapped.graphs) == {8}
    with graph_step(GraphStep("full", 8)):  # another mode's step: this wrapper does not replay
        calls = fn.calls
        wrapped([x, W])
        assert fn.calls == calls + 1 and device.captures == 1


def test_a_full_graph_replays_only_with_the_splitting_ops_state_it_holds():
    state = {"buffers": 1, "decode": True}
    graphs.register_splitting_op(SplittingOp("test_cudagraph::op", state=lambda: state["buffers"],
                                             capturable=lambda: state["decode"]))
    wrapped, fn, device = wrapper("full", splitting_ops=["test_cudagraph::op"])
    x = torch.randn(2, 3)
    state["decode"] = False  # e.g. a prefill step: never captured whole
    wrapped([x, W]), wrapped([x, W]), wrapped([x, W])
    assert device.captures == 0
    state["decode"] = True
    wrapped([x, W]), wrapped([x, W])
    assert device.captures == 1
    state["buffers"] = 2  # other per-step buffers than the graph holds: run, do not replay
    calls = fn.calls
    torch.testing.assert_close(wrapped([x, W])[0], x @ W)
    assert fn.calls == calls + 1 and device.captures == 1


def test_paged_attention_is_the_registered_splitting_op_and_the_default():
    import infer.runtime.attention  # noqa: F401  (registers its op)
    assert "infer::paged_attention" in graphs.registered_splitting_ops()
    assert "infer::paged_attention" in CompilerConfig().splitting_ops
    assert graphs.splitting_op("infer::paged_attention").describe(torch.device("cpu")) == "cpu"


def test_unknown_splitting_ops_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'nope::missing'.*torch.ops does not know"):
        CompilerConfig.from_options({"splitting_ops": ["nope::missing"]})
    assert CompilerConfig.from_options({"splitting_ops": ["aten::mm"]}).splitting_ops == ("aten::mm",)


def test_one_capture_size_policy_for_backend_and_engine():
    from infer.runtime.engine.config import EngineConfig
    assert CompilerConfig().cudagraph_capture_sizes == graphs.capture_sizes(512)
    assert EngineConfig(model="m", max_num_seqs=64).cudagraph_capture_sizes == graphs.capture_sizes(64)
    sizes = graphs.capture_sizes(256)
    assert sizes[:8] == (1, 2, 4, 8, 16, 24, 32, 48) and sizes[-1] == 256 and len(sizes) == 17
    assert graphs.capture_sizes(3) == (1, 2, 3)
    with pytest.raises(ValueError, match="got 0"):
        graphs.capture_sizes(0)
