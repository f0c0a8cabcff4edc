"""The kernels' planning switches as one frozen config, current per context.

``kernel_config()`` is the config in force: the one set by ``use_kernel_config`` around the
call (tests, A/B benchmarks), else the one read once from the environment (:mod:`infer.envs`).
Launchers read it when they plan a launch (at capture time for CUDA graphs).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator

import torch

from ... import envs


@dataclass(frozen=True, slots=True)
class KernelConfig:
    pdl: bool = True  # programmatic dependent launch where the device has it
    skinny_gemm: bool = True  # the skinny-GEMM kernel for its tuned decode shapes (else cuBLAS)
    fuse_kv_write: bool = True  # uniform decode steps write K/V inside decode attention
    decode_combine: bool = True  # latency-bound split decode combines in the partial kernel
    decode_stages: int | None = None  # forced pipelining depth; None: planned per launch
    decode_table_pages: int = 64  # register-held block-table chunk (0: off; a power of two)

    def __post_init__(self) -> None:
        n = self.decode_table_pages
        if not isinstance(n, int) or n < 0 or n & (n - 1):
            raise ValueError(f"decode_table_pages must be 0 or a power of two, got {n!r}")
        if self.decode_stages is not None and (not isinstance(self.decode_stages, int) or self.decode_stages < 1):
            raise ValueError(f"decode_stages must be None or a positive int, got {self.decode_stages!r}")

    @classmethod
    def from_env(cls) -> "KernelConfig":
        return cls(pdl=envs.pdl(), skinny_gemm=envs.skinny_gemm(), fuse_kv_write=envs.fuse_kv_write(),
                   decode_combine=envs.decode_combine(), decode_stages=envs.decode_stages(),
                   decode_table_pages=envs.decode_table_pages())


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 off CUDA (the Triton interpreter: a small grid)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_CURRENT: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar("infer_kernel_config", default=None)


@functools.lru_cache(maxsize=1)
def _from_env() -> KernelConfig:
    return KernelConfig.from_env()


def kernel_config() -> KernelConfig:
    """The config in force here (see the module docstring)."""
    return _CURRENT.get() or _from_env()


@contextlib.contextmanager
def use_kernel_config(config: KernelConfig) -> Iterator[KernelConfig]:
    token = _CURRENT.set(config)
    try:
        yield config
    finally:
        _CURRENT.reset(token)
