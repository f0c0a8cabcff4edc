"""Inner compilers: what turns one transformed ATen graph (or graph piece) into a callable."""
from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import torch
from torch import fx

from .. import torch_internals as internals


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence, inner_compiler: str) -> Callable:
    """Return a boxed callable (takes a list of inputs) computing `gm`."""
    if inner_compiler == "inductor":
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        if not isinstance(output.args[0], (tuple, list)):  # Inductor compiles tuple-returning graphs
            output.args = ((output.args[0],),)
            gm.recompile()
            compiled = _inductor(gm, example_inputs)
            single = lambda args: call_boxed(compiled, args)[0]  # noqa: E731
            single._boxed_call = True
            return single
        return _inductor(gm, example_inputs)
    if inner_compiler == "eager":
        return internals.make_boxed_func(gm.forward)
    raise ValueError(f"unknown inner compiler {inner_compiler!r}; expected 'inductor' or 'eager'")


def prepare_inner_compiler(inner_compiler: str) -> None:
    """Import the inner compiler and compute its one-time keys, for a thread that runs while the
    weights load: a warm Inductor start otherwise spends ~2 s here before its first cache hit
    (importing Inductor, hashing torch's and Triton's sources for its cache keys)."""
    if inner_compiler != "inductor":
        return
    internals.prepare_inductor()


FUNCTIONAL_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "linear", "rms_norm_linear",
                  "add_rms_norm_linear", "silu_mul_linear", "rotary_embedding", "qk_norm_rotary")


@functools.lru_cache(maxsize=None)
def _register_fallbacks() -> None:
    """Give Inductor an explicit fallback lowering for every functional ``infer`` op.

    Without one, Inductor (torch 2.11) formats an op's IR arguments into an INFO log line the
    first time it lowers the op, eagerly; for the chained prologue-fused linears deep in a
    28-layer graph that string is exponential in the depth and compilation never finishes.
    Strides stay those of the FX graph, as with the implicit fallback.
    """
    from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.*)
    for name in FUNCTIONAL_OPS:
        internals.register_inductor_fallback(getattr(torch.ops.infer, name).default)


def _inductor(gm: fx.GraphModule, example_inputs: Sequence) -> Callable:
    _register_fallbacks()
    # Inductor's own Triton kernels join the programmatic-dependent-launch chain of ours
    # (runtime/kernels/pdl.py) where the device supports it.
    return internals.inductor_compile(gm, example_inputs, pdl=_pdl_device(example_inputs))


def _pdl_device(example_inputs: Sequence) -> bool:
    from ..runtime.kernels.pdl import pdl_enabled
    if not internals.inductor_supports_pdl():
        return False
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda), None)
    return device is not None and pdl_enabled(device)


def call_boxed(fn: Callable, args: list) -> object:
    """Call an inner-compiled function whether or not it uses the boxed convention."""
    if getattr(fn, "_boxed_call", False):
        return fn(list(args))
    return fn(*args)


def decomposition_table() -> dict:
    """One table for both inner compilers, so passes always see the same ATen spellings."""
    return internals.inductor_decompositions()


def module_path(placeholder: fx.Node) -> str | None:
    """``layers.0.self_attn.q_proj.weight`` for a Dynamo input whose source is
    ``L['self']._modules['layers']._modules['0']...._parameters['weight']``; None without a source."""
    parts = re.findall(r"\['([^']+)'\]", internals.source_name(placeholder) or "")
    return ".".join(parts[1:]) if len(parts) > 1 else None


def is_parameter_input(placeholder: fx.Node, value: object) -> bool:
    """Whether a Dynamo graph input is a parameter or buffer of the compiled module."""
    if isinstance(value, torch.nn.Parameter):
        return True
    name = internals.source_name(placeholder) or ""
    return "_buffers" in name or "_parameters" in name
