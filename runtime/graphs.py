"""What the compiler is told about the runtime's graphs: which ops split them, which step is running,
and which batch sizes to capture as CUDA graphs.

The compiler names no runtime op and reads no runtime state; it asks this module.

- **Splitting ops.** An op's owner registers it with :func:`register_splitting_op`: an opaque
  custom op the graph is cut around (its pieces compile, and capture, on their own). ``state``
  names the per-step state the op reads beyond its arguments (for paged attention: the metadata
  buffers); a whole-graph capture holds that state and replays only while ``state()`` is the same.
  ``capturable`` says whether the running step may be captured whole (paged attention: a uniform
  decode step). ``describe(device)`` names what the op runs on, for the compile report.
- **The running step.** A runtime that knows what it runs says so with :func:`graph_step`: the
  step's CUDA-graph mode and batch key. A graph wrapper then replays (or captures) the graph of
  that key in that mode, and runs uncaptured in mode ``"none"``. Without a ``graph_step`` (a plain
  ``torch.compile`` user) the wrapper keys by the graph's dynamic token count.
- **Capture sizes.** :func:`capture_sizes` is the one policy for which batch sizes get graphs.

The modes mean one thing everywhere (the backend's ``cudagraph_mode`` and the engine's):
``"piecewise"`` captures the pieces between splitting ops, per token count, for any step;
``"full"`` captures a whole step, splitting ops included, per batch size, for the steps the
splitting ops call capturable (uniform decode); other steps run uncaptured.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import torch

CUDAGRAPH_MODES = ("none", "piecewise", "full")
MAX_CAPTURE_SIZE = 512  # the backend's largest capture size unless told otherwise


def capture_sizes(max_size: int = MAX_CAPTURE_SIZE) -> tuple[int, ...]:
    """Batch sizes to pad to and capture, ending at ``max_size``: 1, 2, 4, 8, then steps of 8 to
    32, of 16 to 128 and of 32 beyond (17 sizes to 256, 25 to 512).

    Each size costs a capture at startup; padding a decode step up to the next size costs little,
    as the weights dominate its time and padded rows have no KV to read.
    """
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
        raise ValueError(f"the largest capture size must be an int >= 1, got {max_size!r}")
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, 129, 16)) + list(range(160, max_size + 32, 32))
    return tuple(s for s in sizes if s < max_size) + (max_size,)


@dataclass(frozen=True, slots=True)
class SplittingOp:
    """An op the graph is split around, as its owner describes it (see the module docstring)."""

    name: str  # "namespace::op"
    state: Callable[[], Hashable] = lambda: None
    capturable: Callable[[], bool] = lambda: True
    describe: Callable[[torch.device], str | None] = lambda device: None


_SPLITTING_OPS: dict[str, SplittingOp] = {}


def register_splitting_op(op: SplittingOp) -> None:
    if not isinstance(op.name, str) or op.name.count("::") != 1:
        raise ValueError(f"a splitting op is named 'namespace::op', got {op.name!r}")
    _SPLITTING_OPS[op.name] = op


def registered_splitting_ops() -> tuple[str, ...]:
    """Names of every registered splitting op, in registration order."""
    return tuple(_SPLITTING_OPS)


def splitting_op(name: str) -> SplittingOp:
    """The registered op ``name``, or a plain one (no state, always capturable) for an op that
    split the graph by name only."""
    return _SPLITTING_OPS.get(name) or SplittingOp(name)


def op_exists(name: str) -> bool:
    """Whether ``torch.ops`` resolves ``"namespace::op"``."""
    namespace, _, op = name.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class GraphStep:
    """The running step as the runtime describes it: the CUDA-graph mode it may replay in
    (``"none"``: run uncaptured) and its batch key (the padded batch size)."""

    mode: str
    batch_key: Hashable = None

    def __post_init__(self) -> None:
        if self.mode not in CUDAGRAPH_MODES:
            raise ValueError(f"graph step mode must be one of {list(CUDAGRAPH_MODES)}, got {self.mode!r}")


_step = threading.local()


@contextmanager
def graph_step(step: GraphStep) -> Iterator[GraphStep]:
    """Describe the step run inside the block to every graph wrapper (nests; per thread)."""
    previous = getattr(_step, "value", None)
    _step.value = step
    try:
        yield step
    finally:
        _step.value = previous


def current_graph_step() -> GraphStep | None:
    return getattr(_step, "value", None)
