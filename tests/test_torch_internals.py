"""infer.torch_internals: one small test per private PyTorch API the library adapts, so that a
torch release that changes one fails here, by name."""
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from infer import torch_internals as internals


def _dynamo_graph(fn, *args):
    """The placeholders of the Dynamo graph of ``fn`` and what the backend saw."""
    seen = {}

    def backend(gm, example_inputs):
        seen["names"] = [internals.source_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
        seen["graph_breaks"] = internals.graph_break_count()
        return gm.forward
    torch.compile(fn, backend=backend)(*args)
    return seen


def test_source_names_of_module_weights_and_arguments():
    lin = torch.nn.Linear(3, 2)
    seen = _dynamo_graph(lin, torch.randn(4, 3))
    names = seen["names"]
    assert "L['args'][0]" in names, names  # the call's argument
    assert any("_parameters['weight']" in n for n in names if n), names


def test_mark_unbacked_gives_one_graph_for_every_size():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    fn = torch.compile(lambda x: x * 2, backend=backend)
    for n in (1, 2, 5):
        x = torch.randn(n, 3)
        internals.mark_unbacked(x, 0)
        assert torch.equal(fn(x), x * 2)
    assert len(graphs) == 1


def test_dynamo_frame_times_and_graph_breaks_count():
    before = len(internals.dynamo_frame_times())
    phases = {name: len(times) for name, times in internals.dynamo_phase_times().items()}
    breaks = internals.graph_break_count()

    def fn(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2
    torch.compile(fn, backend="eager")(torch.randn(2))
    assert len(internals.dynamo_frame_times()) > before
    assert internals.graph_break_count() > breaks
    after = internals.dynamo_phase_times()
    assert all(len(after[name]) > count for name, count in phases.items() if name != "aot_metadata"), after


def test_aot_autograd_boxed_functions_and_output_metadata():
    counts = []

    def inner(gm, example_inputs):
        counts.append(internals.aot_output_count())
        return internals.make_boxed_func(gm.forward)
    backend = internals.aot_autograd(fw_compiler=inner, decompositions=internals.inductor_decompositions())
    with torch.no_grad():
        out = torch.compile(lambda x: (x.sin(), x.cos()), backend=backend)(torch.randn(3))
    assert counts == [2] and torch.allclose(out[0] ** 2 + out[1] ** 2, torch.ones(3))


def test_fake_modes_tracing_context_and_real_ops_inside():
    gm = make_fx(lambda x: x + 1, tracing_mode="fake")(torch.randn(2, 3))
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = internals.fake_mode_of(vals)
    assert mode is not None and internals.detect_fake_mode(vals) is mode
    with internals.tracing_context(mode):
        assert torch._guards.TracingContext.try_get().fake_mode is mode
        assert isinstance(torch.ones(2) + 1, torch.Tensor)
    with mode, internals.unset_fake_temporarily():
        assert type(torch.ones(1)) is torch.Tensor  # a real tensor inside the fake trace
    new_mode, shape_env = internals.new_fake_mode()
    assert new_mode.shape_env is shape_env
    from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module
    with internals.plain_graph_modules():
        assert not isinstance(_make_graph_module(torch.nn.Module(), gm.graph), _LazyGraphModule)


def test_contiguity_and_op_overloads():
    x = torch.randn(4, 6)
    assert internals.is_contiguous_or_false(x) and not internals.is_contiguous_or_false(x.t())
    assert internals.is_op_overload(torch.ops.aten.mm.default) and not internals.is_op_overload(F.linear)


def test_custom_op_function_is_the_python_implementation():
    @torch.library.custom_op("infer_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2
    fn = internals.custom_op_function(torch.ops.infer_test.twice.default)
    assert fn is not None and torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert internals.custom_op_function(torch.ops.aten.mm.default) is None


def test_pass_through_errors_reach_the_user_unwrapped():
    class Bad(ValueError, internals.PassThroughError):
        def __init__(self, message):
            ValueError.__init__(self, message)
            self.first_useful_frame = None

    def backend(gm, example_inputs):
        raise Bad("a bad option")
    try:
        torch.compile(lambda x: x + 1, backend=backend)(torch.randn(2))
    except Bad as e:
        assert str(e).startswith("a bad option") and e.__cause__ is None
    else:
        raise AssertionError("no error")


def test_inductor_decompositions_work_in_a_fresh_table():
    table = internals.inductor_decompositions()
    assert torch.ops.aten.max_pool2d_with_indices.default in table
    assert internals.inductor_supports_pdl() in (True, False)
