"""Dynamo graph -> functional ATen inference graph -> passes -> (split) -> inner compiler."""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch
from torch import fx

from .. import torch_internals as internals
from ..passes.base import PassContext
from ..passes.manager import PassManager, PassOptions
from .config import CompilerConfig
from .errors import InferUsageError
from .inner import call_boxed, decomposition_table, is_parameter_input, module_path
from .recording import current_recording
from .reload import fresh_tracing, same_as_reloaded
from .report import REPORTS, CompileReport
from .split import compile_pieces

logger = logging.getLogger("infer")


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, config: CompilerConfig) -> Callable:
    """Compile one Dynamo graph with `config`; publish the report as `last_report()`."""
    _check_inference_only(example_inputs)
    frames_before = REPORTS.frames_compiled()
    report = CompileReport(inner_compiler=config.inner_compiler, cudagraph_mode=config.cudagraph_mode)
    static, names = _static_inputs(gm, example_inputs)
    recording = current_recording()
    record = recording.recorder(gm, example_inputs, config, report) if recording is not None else None
    start = time.perf_counter()
    transform_s = 0.0

    def compile_inference(aot_gm: fx.GraphModule, aot_inputs: Sequence) -> Callable:
        nonlocal transform_s
        begin = time.perf_counter()
        try:
            return _transform_and_compile(aot_gm, aot_inputs, static, names, config, report, record)
        finally:
            transform_s += time.perf_counter() - begin

    compiled = internals.aot_autograd(fw_compiler=compile_inference, inference_compiler=compile_inference,
                            decompositions=decomposition_table(),
                            keep_inference_input_mutations=True)(gm, example_inputs)
    if record is not None:
        record.attach(compiled)
    report.time_total_s = time.perf_counter() - start
    report.time_aot_s = report.time_total_s - transform_s
    REPORTS.publish(report, frames_before)
    logger.info("compiled graph:\n%s", report.summary())
    return compiled


def _transform_and_compile(gm: fx.GraphModule, example_inputs: Sequence, static: list, names: list,
                           config: CompilerConfig, report: CompileReport, record: Callable | None = None) -> Callable:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static_by_name, names_by_name = {}, {}
    if len(placeholders) == len(static):  # AOT keeps Dynamo's input order for inference graphs
        static_by_name = {n.name: t for n, t in zip(placeholders, static) if t is not None}
        names_by_name = {n.name: name for n, name in zip(placeholders, names) if name}
    context = PassContext(static_inputs=static_by_name, input_names=names_by_name)
    report.nodes_before = len(gm.graph.nodes)
    start = time.perf_counter()
    report.passes = PassManager(PassOptions.of(config), context)(gm.graph)
    for kind, n in context.fusions.items():
        report.count_fusion(kind, n)
    report.near_misses += context.near_misses
    gm.recompile()
    report.time_passes_s = time.perf_counter() - start
    report.nodes_after = len(gm.graph.nodes)
    saved = record(gm, context.extra_recipes) if record is not None else None  # the graph before the split

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    is_static = [n.name in context.static_inputs for n in placeholders]
    inputs = list(example_inputs) + [n.meta["val"] for n in placeholders[len(example_inputs):]]
    index = {n.name: i for i, n in enumerate(placeholders[:len(example_inputs)])}
    sources = [tuple(index[name] for name in recipe[1]) if recipe and recipe[0] == "pack" else None
               for recipe in context.extra_recipes]
    if not saved or config.inner_compiler != "inductor":
        return compile_transformed(gm, inputs, is_static, context.extra_inputs, config, report, sources)
    # Compile what a warm load will compile, so that Inductor's FX graph cache holds it: a later
    # process then skips lowering and code generation. (The eager inner compiler has no cache to
    # fill; the round trip would only cost it time.)
    gm, inputs = same_as_reloaded(saved["graph"], config)
    with fresh_tracing(inputs):
        return compile_transformed(gm, inputs, is_static, context.extra_inputs, config, report, sources)


def compile_transformed(gm: fx.GraphModule, example_inputs: Sequence, is_static: list[bool], constants: list,
                        config: CompilerConfig, report: CompileReport,
                        sources: list[tuple[int, ...] | None] | None = None) -> Callable:
    """Split and inner-compile a graph the passes have transformed; `constants` feed its trailing
    inputs, and `sources` names, per constant, the graph inputs a weight pack was made from."""
    start = time.perf_counter()
    compiled = compile_pieces(gm, example_inputs, is_static, config, report)
    report.time_inner_s = time.perf_counter() - start
    return compiled if not constants else _with_constants(compiled, constants, sources)


def _with_constants(compiled: Callable, constants: list, sources: list[tuple[int, ...] | None] | None = None
                    ) -> Callable:
    """Feed the tensors passes created (packed weights) as trailing inputs.

    Dynamo may run one graph for several modules: after a graph break inside a repeated block,
    every layer calls the same resumed frame with its own weights as inputs. A weight pack is
    therefore fed only while its first source weight is the call's own (packing made the sources
    views of the pack, so the pointers match); other weights are packed the same way on their
    first call, and that pack is kept for them.
    """
    from ..passes.gemm_pack import pack_in_place

    constants = list(constants)
    checks = [(slot, idx) for slot, idx in enumerate(sources or ()) if idx]
    packs: dict[tuple[int, ...], torch.Tensor] = {}

    def feed_for(args: list) -> list:
        feed = constants
        for slot, idx in checks:
            if args[idx[0]].data_ptr() == feed[slot].data_ptr():
                continue
            key = tuple(args[i].data_ptr() for i in idx)
            packed = packs.get(key)
            if packed is None:
                packed = pack_in_place([args[i] for i in idx])
                packs[tuple(args[i].data_ptr() for i in idx)] = packed  # the sources are its views now
            feed = list(feed) if feed is constants else feed
            feed[slot] = packed
        return feed

    def run(args: list):
        return call_boxed(compiled, list(args) + feed_for(args))
    run._boxed_call = True
    return run


def _static_inputs(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[list, list]:
    """Per Dynamo graph input: the tensor if it is a parameter or buffer (else None), and its
    module path (``layers.0.mlp.up_proj.weight``, else None)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return [None] * len(example_inputs), [None] * len(example_inputs)
    static = [t if isinstance(t, torch.Tensor) and is_parameter_input(n, t) else None
              for n, t in zip(placeholders, example_inputs)]
    return static, [module_path(n) if t is not None else None for n, t in zip(placeholders, static)]


def _check_inference_only(example_inputs: Sequence) -> None:
    if not torch.is_grad_enabled():
        return
    needs_grad = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if needs_grad:
        raise InferUsageError(
            f"backend 'infer' compiles inference graphs only, but grad is enabled and {len(needs_grad)} "
            "graph input(s) (parameters) require grad; call the compiled model under "
            "`with torch.inference_mode():` or `with torch.no_grad():`, or set requires_grad=False")
