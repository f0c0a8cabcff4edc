"""The package's import graph: one layering, no cycles, deferred imports included (read with ast).

From the bottom: custom ops, kernels, attention and collectives (``runtime.ops``,
``runtime.kernels``, ``runtime.attention``, ``runtime.distributed``, with ``envs`` and
``torch_internals``) -> ``passes`` -> ``compiler``
-> ``models`` -> the engine (``runtime.engine``, ``from infer import LLM``) -> CLI and benchmarks.
A module imports modules of its own layer or lower ones only.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "passes", "compiler", "models", "engine", "entry points"]


def layer_of(module: str) -> int:
    parts = module.split(".")
    if module == "infer":
        return LAYERS.index("engine")  # the package's lazy LLM / SamplingParams
    top = parts[1]
    if top in ("runtime", "envs", "torch_internals"):
        below_engine = len(parts) == 2 or parts[2] != "engine"
        return LAYERS.index("kernels" if below_engine else "engine")
    return LAYERS.index({"passes": "passes", "compiler": "compiler", "models": "models"}.get(top, "entry points"))


def library_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["infer", *parts])] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that `module` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != module}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_no_upward_imports():
    graph = import_graph()
    assert len(graph) > 50 and "infer.compiler.pipeline" in graph and "infer.runtime.engine.llm" in graph
    upward = [f"{m} ({LAYERS[layer_of(m)]}) -> {t} ({LAYERS[layer_of(t)]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports: "
          f"{len(found)} cycles, {len(upward)} upward imports")
    assert not found, found
    assert not upward, "\n".join(upward)


def test_the_checker_sees_deferred_imports_and_cycles():
    """What the test above relies on: a function-level import is an edge, a loop is found."""
    modules = library_modules()
    assert "infer.passes.gemm_pack" in imports_of("infer.compiler.pipeline", modules["infer.compiler.pipeline"], modules)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("infer.runtime.kernels.pdl") < layer_of("infer.passes.base") < layer_of("infer.compiler.cache") \
        < layer_of("infer.models.llama") < layer_of("infer.runtime.engine.llm") < layer_of("infer.benchmarks.decode")
