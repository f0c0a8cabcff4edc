"""Every private PyTorch API the library uses, adapted in one place.

A torch release that moves or changes one of these fails here, in one function, and in its test
(``tests/test_torch_internals.py``), instead of somewhere inside a compile. Each function says
what it adapts. Nothing here patches torch: each call uses the API as it is.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx

# --------------------------------------------------------------------------- Dynamo
try:  # an exception deriving from it passes through Dynamo's BackendCompilerFailed unwrapped
    from torch._dynamo.exc import ShortenTraceback as PassThroughError
except ImportError:  # a torch without it: errors still raise, only wrapped
    class PassThroughError(Exception):  # type: ignore[no-redef]
        pass


def mark_unbacked(t: torch.Tensor, dim: int) -> None:
    """Dim ``dim`` of ``t`` is traced as a size with no 0/1 specialization and no guard."""
    from torch._dynamo.decorators import mark_unbacked as mark
    mark(t, dim)


def source_name(placeholder: fx.Node) -> str | None:
    """Dynamo's guard source of a graph input (``L['x']``, ``L['self']._modules[...]``), or None.
    ``Source.name`` is a method in torch 2.11 and a property from 2.12 on."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else name


def dynamo_frame_times() -> list[float]:
    """Seconds Dynamo spent on each frame it compiled in this process, in order."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return []
    return list(compilation_time_metrics.get(DYNAMO_PHASES["frame"], []))


DYNAMO_PHASES = {  # our name -> the key of Dynamo's compilation_time_metrics
    "frame": "_compile.compile_inner", "tracing": "bytecode_tracing", "aot_metadata": "aot_collect_metadata",
    "backend": "OutputGraph.call_user_compiler", "guards": "build_guards"}


def dynamo_phase_times() -> dict[str, list[float]]:
    """Seconds Dynamo spent in each phase (see ``DYNAMO_PHASES``), one entry per time it ran."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {name: [] for name in DYNAMO_PHASES}
    return {name: list(compilation_time_metrics.get(key, [])) for name, key in DYNAMO_PHASES.items()}


def graph_break_count() -> int:
    """Graph breaks Dynamo has counted in this process."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


# --------------------------------------------------------------------------- AOT autograd
def aot_autograd(**kwargs: Any) -> Callable:
    """Dynamo's AOT-autograd backend factory (``fw_compiler=``, ``decompositions=``, ...)."""
    from torch._dynamo.backends.common import aot_autograd as factory
    return factory(**kwargs)


def make_boxed_func(fn: Callable) -> Callable:
    """``fn`` in AOT's boxed calling convention (one list of inputs)."""
    from torch._functorch.aot_autograd import make_boxed_func as boxed
    return boxed(fn)


def aot_output_count() -> int:
    """How many outputs the graph being compiled has, from AOT's metadata; ValueError (with the
    reason) unless it returns only fresh tensors, mutates inputs only inside the graph and uses no
    effect tokens, intermediate bases or tensor subclasses."""
    from torch._functorch._aot_autograd.schemas import MutationType, OutputType, SubclassCreationMeta

    meta = getattr(torch._guards.TracingContext.try_get(), "fw_metadata", None)
    if meta is None:
        raise ValueError("no AOT metadata for the graph")
    if not meta.output_info or any(o.output_type != OutputType.non_alias for o in meta.output_info):
        raise ValueError("the graph does not return only fresh tensors")
    if any(i.mutation_type not in (MutationType.NOT_MUTATED, MutationType.MUTATED_IN_GRAPH) for i in meta.input_info):
        raise ValueError("an input mutation happens outside the graph")
    if meta.tokens or meta.num_intermediate_bases or any(
            isinstance(m, SubclassCreationMeta) for m in meta.subclass_inp_meta):
        raise ValueError("the graph uses effect tokens, intermediate bases or tensor subclasses")
    return len(meta.output_info)


# --------------------------------------------------------------------------- fake tensors, tracing
def unset_fake_temporarily() -> contextlib.AbstractContextManager:
    """Real tensor ops inside a fake-tensor trace (weights packed at compile time)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily as unset
    return unset()


def detect_fake_mode(values: Sequence) -> Any:
    """The fake mode of ``values`` (or of the tracing context), or None."""
    from torch._guards import detect_fake_mode as detect
    return detect(values)


def fake_mode_of(values: Sequence) -> Any:
    """The fake mode of the first fake tensor in ``values`` itself (not the tracing context's)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)


def new_fake_mode() -> tuple[Any, Any]:
    """``(fake_mode, shape_env)``: a fresh symbolic fake mode that accepts real inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    shape_env = ShapeEnv()
    return FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True), shape_env


@contextlib.contextmanager
def tracing_context(fake_mode: Any) -> Iterator[None]:
    """A new tracing context around ``fake_mode``, real ops allowed, plain (not lazy) graph
    modules: Inductor's FX graph cache keys on both."""
    from torch._guards import TracingContext, tracing
    with unset_fake_temporarily(), tracing(TracingContext(fake_mode)), plain_graph_modules():
        yield


def plain_graph_modules() -> contextlib.AbstractContextManager:
    """``fx.GraphModule``s built eagerly, not lazily (one kind of module in and out of Dynamo)."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module
    return _use_lazy_graph_module(False)


def is_contiguous_or_false(val: torch.Tensor) -> bool:
    """Whether ``val`` is provably row-major contiguous (False where symbolic sizes leave it open)."""
    from torch import _prims_common
    check = getattr(_prims_common, "is_contiguous_or_false", None)
    return bool(check(val)) if check is not None else bool(val.is_contiguous())


# --------------------------------------------------------------------------- custom ops
def is_op_overload(target: Any) -> bool:
    """Whether an FX node's target is an ATen / ``torch.library`` op overload."""
    return isinstance(target, torch._ops.OpOverload)


def custom_op_function(op: Any) -> Callable | None:
    """The Python function behind a ``torch.library.custom_op``, to call without the dispatcher
    (tens of microseconds a call); None if ``op`` is not one."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    schema = getattr(op, "_schema", None)
    opdef = OPDEFS.get(schema.name) if schema is not None else None
    fn = getattr(opdef, "_init_fn", None)
    return fn if callable(fn) else None


# --------------------------------------------------------------------------- Inductor
def inductor_decompositions() -> dict:
    """Inductor's decomposition table. Its decompositions call into ``torch._inductor.lowering``
    (``max_pool2d_with_indices`` asks it whether to fall back), which only Inductor itself
    imports: imported here, so that a model compiles the same whatever ran before it."""
    import torch._inductor.lowering  # noqa: F401  (read by the decompositions when they run)
    from torch._inductor.decomposition import select_decomp_table
    return select_decomp_table()


def prepare_inductor() -> None:
    """Import Inductor and compute its one-time cache keys (hashes of torch's and Triton's sources)."""
    from torch._inductor import codecache, compile_fx, lowering  # noqa: F401
    codecache.torch_key()
    codecache.triton_key()


def register_inductor_fallback(op: Any) -> None:
    """An explicit fallback lowering for ``op`` that keeps the FX graph's strides (no warning)."""
    from torch._inductor.lowering import constrain_to_fx_strides, lowerings, make_fallback
    if op not in lowerings:
        make_fallback(op, layout_constraint=constrain_to_fx_strides, warn=False)


def inductor_supports_pdl() -> bool:
    from torch._inductor import config as inductor_config
    return hasattr(inductor_config.triton, "enable_pdl")


def inductor_compile(gm: fx.GraphModule, example_inputs: Sequence, pdl: bool = False) -> Callable:
    """``compile_fx_inner`` of one graph (or piece). Inside a tracing context the piece does not
    report its output strides into the context of the whole graph."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner

    context = torch._guards.TracingContext.try_get()
    with inductor_config.patch({"triton.enable_pdl": True} if pdl else {}):
        if context is None:
            return compile_fx_inner(gm, list(example_inputs))
        saved, context.output_strides = context.output_strides, None
        try:
            return compile_fx_inner(gm, list(example_inputs))
        finally:
            context.output_strides = saved
