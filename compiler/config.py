"""The compiler's one configuration object, built from `torch.compile(..., options={...})`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..runtime import graphs
from ..runtime.graphs import CUDAGRAPH_MODES

INNER_COMPILERS = ("inductor", "eager")


@dataclass(frozen=True, slots=True)
class CompilerConfig:
    """Everything the backend does is decided here; nothing is changed after construction."""

    inner_compiler: str = "inductor"
    eliminate_noops: bool = True
    fuse_norm: bool = True
    fuse_activation: bool = True
    fuse_gemm: bool = True
    fuse_linear: bool = True
    fuse_qk_norm_rope: bool = True  # q/k RMSNorm + rotary in one op; needs fuse_norm
    decompose_on_cpu: bool = True  # on CPU, ops that only run their plain-torch chain are spelled out
    lint: bool = True
    dump_graphs: bool = False
    # every op registered with infer.runtime.graphs.register_splitting_op (paged attention)
    splitting_ops: tuple[str, ...] = field(default_factory=graphs.registered_splitting_ops)
    cudagraph_mode: str = "none"
    cudagraph_capture_sizes: tuple[int, ...] = field(default_factory=graphs.capture_sizes)
    debug_cudagraph_addresses: bool = False

    def __post_init__(self) -> None:
        _check_choice("inner_compiler", self.inner_compiler, INNER_COMPILERS)
        _check_choice("cudagraph_mode", self.cudagraph_mode, CUDAGRAPH_MODES)
        for name in ("eliminate_noops", "fuse_norm", "fuse_activation", "fuse_gemm", "fuse_linear",
                     "fuse_qk_norm_rope", "decompose_on_cpu", "lint", "dump_graphs", "debug_cudagraph_addresses"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} must be True or False, got {value!r}")
        if not isinstance(self.splitting_ops, tuple) or not all(
                isinstance(op, str) and "::" in op for op in self.splitting_ops):
            raise ValueError(
                "option 'splitting_ops' must be a tuple of 'namespace::op' names, "
                f"got {self.splitting_ops!r}")
        unknown = [op for op in self.splitting_ops
                   if op not in graphs.registered_splitting_ops() and not graphs.op_exists(op)]
        if unknown:
            raise ValueError(
                f"option 'splitting_ops' names {unknown}, which torch.ops does not know; registered "
                f"splitting ops: {list(graphs.registered_splitting_ops())}")
        sizes = self.cudagraph_capture_sizes
        if (not isinstance(sizes, tuple) or not sizes
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
            raise ValueError(
                "option 'cudagraph_capture_sizes' must be a non-empty tuple of positive ints, "
                f"got {sizes!r}")
        object.__setattr__(self, "cudagraph_capture_sizes", tuple(sorted(set(sizes))))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "CompilerConfig":
        """Map `torch.compile` options onto the config; unknown names are a ValueError."""
        if options is None:
            return cls()
        if isinstance(options, CompilerConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict, got {type(options).__name__}")
        accepted = cls.option_names()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for backend 'infer'; accepted: {', '.join(accepted)}")
        values = dict(options)
        for name in ("splitting_ops", "cudagraph_capture_sizes"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def cache_key(self) -> str:
        return repr(dataclasses.astuple(self))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
