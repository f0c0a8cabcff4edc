"""The opaque custom op ``torch.ops.infer.paged_attention`` and its run-time backend choice.

Schema::

    infer::paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale) -> Tensor

Layouts: ``q`` is ``[T, Hq*D]`` or ``[T, Hq, D]``; ``k``/``v`` are ``[T, Hkv*D]`` or
``[T, Hkv, D]``; ``kv_cache`` is ``[2, num_blocks, block_size, Hkv, D]`` (K at index 0, V at 1).
``D`` is read from the cache, ``Hq`` from ``q``. The result has q's shape (2-d or 3-d) and dtype
and is contiguous; the fake implementation returns ``q.new_empty(q.shape)``.

The op writes k/v at ``slot_mapping`` (skipping ``-1``), then runs causal attention of each query
token over its sequence's cache. A slot written in a step must not be read by another sequence in
that step (the block manager shares only full, already written blocks): on CUDA a decode step
writes and reads in one kernel, whose programs run in no fixed order. Per-step metadata comes from ``get_forward_context()``, not from
graph inputs, so one traced graph serves every step; the ``(a!)`` annotation keeps the cache
mutation visible to functionalization so the op is never reordered or dropped.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import Tensor

from ... import envs
from ..graphs import SplittingOp, register_splitting_op
from .context import current_forward_context, get_forward_context
from .cpu import paged_attention_cpu
from .flash import attend_flash, flash_attn_available, supports_block_size
from .metadata import AttentionMetadata
from .reference import paged_attention_reference

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "INFER_ATTENTION_BACKEND"
BACKENDS = ("cpu", "reference", "triton", "flash_attn")
SUPPORTED_HEAD_DIMS = (64, 128, 256)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None




def select_backend(device: torch.device | str) -> str:
    """Pick "triton" (CUDA), "cpu" (CPU) or "reference" for ``device``; ``$INFER_ATTENTION_BACKEND`` overrides,
    and is the only way to run "flash_attn" (opt-in: the flash-attn adapter has no test that runs it).

    "triton" on a non-CUDA device is accepted only under ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    override = envs.attention_backend()
    if override:
        if override not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV_VAR}={override!r} is not one of {BACKENDS}")
        if override == "flash_attn" and (device.type != "cuda" or not flash_attn_available()):
            raise RuntimeError(f"{BACKEND_ENV_VAR}=flash_attn needs CUDA and the flash_attn package (device {device})")
        if override == "triton" and not _triton_available():
            raise RuntimeError(f"{BACKEND_ENV_VAR}=triton but triton is not installed")
        if override == "cpu" and device.type != "cpu":
            raise RuntimeError(f"{BACKEND_ENV_VAR}=cpu on device {device}: the cpu backend runs CPU tensors only")
        if override == "triton" and device.type != "cuda" and not envs.triton_interpret():
            raise RuntimeError(f"{BACKEND_ENV_VAR}=triton on device {device} needs TRITON_INTERPRET=1")
        return override
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda" or not _triton_available():
        return "reference"
    return "triton"  # flash_attn only when asked for: no test here runs it


def attention_backend_name(device: torch.device | str, block_size: int | None = None) -> str:
    """The backend the op will actually run on ``device`` (for the compile report)."""
    name = select_backend(device)
    if name == "flash_attn" and block_size is not None and not supports_block_size(block_size):
        return "triton"
    return name


def _split_heads(x: Tensor, head_dim: int, what: str) -> Tensor:
    """View ``[T, H*D]`` or ``[T, H, D]`` as ``[T, H, D]``."""
    if x.dim() == 3:
        if x.shape[2] != head_dim:
            raise ValueError(f"{what} has head_dim {x.shape[2]}, kv_cache has {head_dim}")
        return x
    if x.dim() != 2 or x.shape[1] % head_dim != 0:
        raise ValueError(f"{what} must be [T, H*{head_dim}] or [T, H, {head_dim}], got {tuple(x.shape)}")
    return x.unflatten(1, (x.shape[1] // head_dim, head_dim))


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes/dtypes and return 3-d views q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_cache.shape)}")
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    q3, k3, v3 = (_split_heads(x, head_dim, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if k3.shape != v3.shape or k3.shape[1] != num_kv_heads or k3.shape[0] != q3.shape[0]:
        raise ValueError(
            f"k {tuple(k3.shape)} and v {tuple(v3.shape)} must be [T={q3.shape[0]}, Hkv={num_kv_heads}, D={head_dim}]"
        )
    if q3.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_q_heads={q3.shape[1]} is not a multiple of num_kv_heads={num_kv_heads}")
    if not (q.dtype == k.dtype == v.dtype == kv_cache.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}, kv_cache {kv_cache.dtype}")
    return q3, k3, v3


def _check_metadata(metadata: AttentionMetadata, device: torch.device) -> None:
    if metadata.slot_mapping.device != device or metadata.block_tables.device != device:
        raise ValueError(f"attention metadata lives on {metadata.slot_mapping.device}, q on {device}")


def _run_triton(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float, md: AttentionMetadata,
                use_flash: bool) -> Tensor:
    from ..kernels import attention_triton as kernels  # lazy: importing triton is optional

    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton paged attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {q.shape[2]}")
    if not use_flash and md.is_uniform_decode and q.shape[0] == md.num_seqs \
            and kernels.fuse_kv_write():
        # one kernel: the decode program covering each sequence's last position also stores its k/v
        return kernels.decode_attention_with_kv_write(
            q, k, v, kv_cache, md.slot_mapping, md.seq_lens, md.block_tables, scale
        )
    kernels.write_kv_cache(k, v, kv_cache, md.slot_mapping)
    if use_flash:
        return attend_flash(q, kv_cache, scale, md)
    if md.is_uniform_decode:
        return kernels.decode_attention(q, kv_cache, md.seq_lens, md.block_tables, scale)
    return kernels.prefill_attention(
        q, kv_cache, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, scale
    )


@torch.library.custom_op("infer::paged_attention", mutates_args=("kv_cache",))
def paged_attention(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float) -> Tensor:
    """Write k/v into the paged cache, then causal attention per sequence (see module docstring)."""
    q3, k3, v3 = _check_inputs(q, k, v, kv_cache)
    metadata = get_forward_context()
    _check_metadata(metadata, q.device)
    backend = select_backend(q.device)
    if backend == "flash_attn" and not supports_block_size(kv_cache.shape[2]):
        logger.debug("flash_attn needs block_size %% 256 == 0, got %d; using triton", kv_cache.shape[2])
        backend = "triton"
    if backend == "cpu":
        out = paged_attention_cpu(q3, k3, v3, kv_cache, scale, metadata)  # [T, Hq, D]
    elif backend == "reference":
        out = paged_attention_reference(q3, k3, v3, kv_cache, scale, metadata)  # [T, Hq, D]
    else:
        out = _run_triton(q3, k3, v3, kv_cache, scale, metadata, use_flash=backend == "flash_attn")
    return out.reshape(q.shape)


@paged_attention.register_fake
def _paged_attention_fake(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float) -> Tensor:
    _check_inputs(q, k, v, kv_cache)
    return q.new_empty(q.shape)


def _metadata_state() -> tuple | None:
    """What a whole-graph capture holds of the running step: the addresses of the metadata
    buffers (updated in place between steps) and its host ints. None outside a forward context."""
    md = current_forward_context()
    if md is None:
        return None
    return (md.slot_mapping.data_ptr(), md.query_start_loc.data_ptr(), md.seq_lens.data_ptr(),
            md.block_tables.data_ptr(), md.max_query_len, md.num_seqs)


def _capturable() -> bool:
    """A whole step holding this op is captured for uniform decode steps only."""
    md = current_forward_context()
    return md is None or md.is_uniform_decode


register_splitting_op(SplittingOp(
    "infer::paged_attention", state=_metadata_state, capturable=_capturable,
    describe=lambda device: attention_backend_name(device)))
