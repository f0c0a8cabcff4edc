"""Programmatic dependent launch (PDL) for this project's Triton kernels.

On Hopper and newer GPUs a kernel launched with ``launch_pdl=True`` may start while the kernel
before it in the stream is still finishing. Such a kernel must execute ``gdc_wait`` before it
touches anything the earlier kernels write, and may do independent work first: the decode-step
GEMV issues the loads of its first weight tile (weights are never written during a step), so a
chain of small projections streams weights while the previous kernel drains. Each PDL kernel
also calls ``gdc_launch_dependents`` once all its programs have started, which lets the next
kernel's programs be scheduled onto SMs as soon as they free up. Both instructions are no-ops
when the kernel was launched without PDL. Captured into a CUDA graph, the launch attribute
becomes a programmatic edge, so replays overlap the same way.

``KernelConfig.pdl`` (``INFER_PDL=0``) turns it off; the Triton interpreter never uses it.
"""
from __future__ import annotations

import functools

import torch

from ... import envs
from .tuning import kernel_config


# Rows up to which the small elementwise/norm kernels of a step (RMSNorm, SiLU-and-mul, q/k norm +
# rotary) join the PDL chain: decode-sized steps, where they sit between GEMVs that trigger early.
PDL_MAX_ROWS = 64


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (CUDA, compute capability >= 9, not disabled)."""
    if device.type != "cuda" or not kernel_config().pdl or envs.triton_interpret():
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_options(device: torch.device, enable: bool = True) -> dict:
    """Extra keyword arguments of a Triton launch on ``device``: the ``USE_PDL`` constexpr and the
    launch flag; ``enable=False`` (a caller's own heuristic) launches without PDL."""
    if enable and pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
