"""The opaque custom op ``torch.ops.infer.paged_attention`` and its run-time backend choice.

Schema::

    infer::paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale,
                           Tensor? cos=None, Tensor? sin=None, bool qk_norm=False, ...) -> Tensor

(the optional arguments fold ``infer::qk_norm_rotary`` / ``infer::rotary_embedding`` into the op;
see :func:`paged_attention`).

Layouts: ``q`` is ``[T, Hq*D]`` or ``[T, Hq, D]``; ``k``/``v`` are ``[T, Hkv*D]`` or
``[T, Hkv, D]``; ``kv_cache`` is ``[2, num_blocks, block_size, Hkv, D]`` (K at index 0, V at 1).
``D`` is read from the cache, ``Hq`` from ``q``. The result has q's shape (2-d or 3-d) and dtype
and is contiguous; the fake implementation returns ``q.new_empty(q.shape)``.

The op writes k/v at ``slot_mapping`` (skipping ``-1``), then runs causal attention of each query
token over its sequence's cache. Per-step metadata comes from ``get_forward_context()``, not from
graph inputs, so one traced graph serves every step; the ``(a!)`` annotation keeps the cache
mutation visible to functionalization so the op is never reordered or dropped.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .context import get_forward_context
from .flash import attend_flash, flash_attn_available, supports_block_size
from .metadata import AttentionMetadata
from .reference import paged_attention_reference

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "INFER_ATTENTION_BACKEND"
BACKENDS = ("reference", "triton", "flash_attn")
SUPPORTED_HEAD_DIMS = (64, 128, 256)


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device | str) -> str:
    """Pick "flash_attn", "triton" or "reference" for ``device``; ``$INFER_ATTENTION_BACKEND`` overrides.

    "triton" on a non-CUDA device is accepted only under ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    override = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if override:
        if override not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV_VAR}={os.environ[BACKEND_ENV_VAR]!r} is not one of {BACKENDS}")
        if override == "flash_attn" and (device.type != "cuda" or not flash_attn_available()):
            raise RuntimeError(f"{BACKEND_ENV_VAR}=flash_attn needs CUDA and the flash_attn package (device {device})")
        if override == "triton" and not _triton_available():
            raise RuntimeError(f"{BACKEND_ENV_VAR}=triton but triton is not installed")
        if override == "triton" and device.type != "cuda" and not _triton_interpreted():
            raise RuntimeError(f"{BACKEND_ENV_VAR}=triton on device {device} needs TRITON_INTERPRET=1")
        return override
    if device.type != "cuda" or not _triton_available():
        return "reference"
    return "flash_attn" if flash_attn_available() else "triton"


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
                use_flash: bool, rope: Rope | None = None) -> Tensor:
    from ..kernels import attention_triton as kernels  # lazy: importing triton is optional

    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton paged attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {q.shape[2]}")
    if not use_flash and md.is_uniform_decode and q.shape[0] == md.num_seqs \
            and kernels.fuse_kv_write(md.num_seqs, kv_cache.shape[3], q.device):
        # one kernel: the decode program covering each sequence's last position also stores its k/v
        # (and norms and rotates q and the new k first, when given raw)
        return kernels.decode_attention_with_kv_write(
            q, k, v, kv_cache, md.slot_mapping, md.seq_lens, md.block_tables, scale,
            rope=None if rope is None else rope.kernel_args(kv_cache.dtype),
        )
    if rope is not None:
        q, k = rope.apply(q, k)
    kernels.write_kv_cache(k, v, kv_cache, md.slot_mapping)
    if use_flash:
        return attend_flash(q, kv_cache, scale, md)
    if md.is_uniform_decode:
        return kernels.decode_attention(q, kv_cache, md.seq_lens, md.block_tables, scale)
    return kernels.prefill_attention(
        q, kv_cache, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, scale
    )


@dataclass(frozen=True, slots=True)
class Rope:
    """The optional arguments of ``paged_attention``: q and k arrive raw and get
    ``infer::qk_norm_rotary`` (``qk_norm``) or ``infer::rotary_embedding`` first."""

    cos: Tensor
    sin: Tensor
    qk_norm: bool
    q_weight: Tensor | None
    k_weight: Tensor | None
    q_eps: float
    k_eps: float
    q_cast: bool
    k_cast: bool

    def apply(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(q [T, Hq, D], k [T, Hkv, D])`` normed (optionally) and rotated, in their own dtypes."""
        if not self.qk_norm:
            return torch.ops.infer.rotary_embedding(q, k, self.cos, self.sin)
        return torch.ops.infer.qk_norm_rotary(q, self.q_weight, self.q_eps, self.q_cast, q.dtype, k, self.k_weight,
                                              self.k_eps, self.k_cast, k.dtype, self.cos, self.sin)

    def kernel_args(self, dtype: torch.dtype):
        from ..kernels.attention_triton import RopeArgs
        from ..kernels.rotary_triton import NormArgs
        if not self.qk_norm:
            return RopeArgs(self.cos, self.sin)
        return RopeArgs(self.cos, self.sin, NormArgs(self.q_weight, self.q_eps, self.q_cast, dtype),
                        NormArgs(self.k_weight, self.k_eps, self.k_cast, dtype))


@torch.library.custom_op("infer::paged_attention", mutates_args=("kv_cache",))
def paged_attention(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float,
                    cos: Tensor | None = None, sin: Tensor | None = None, qk_norm: bool = False,
                    q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                    q_norm_eps: float = 0.0, k_norm_eps: float = 0.0,
                    q_cast_before_weight: bool = False, k_cast_before_weight: bool = False) -> Tensor:
    """Write k/v into the paged cache, then causal attention per sequence (see module docstring).

    With ``cos``/``sin`` (``[T, R/2]``), q and k are raw: each is first rotated, after its RMSNorm
    over ``D`` when ``qk_norm`` (exactly ``infer::qk_norm_rotary`` with out dtype = input dtype);
    the small-batch decode kernel does this in its own registers (one launch less per layer).
    """
    q3, k3, v3 = _check_inputs(q, k, v, kv_cache)
    rope = _rope(cos, sin, qk_norm, q_norm_weight, k_norm_weight, q_norm_eps, k_norm_eps, q_cast_before_weight,
                 k_cast_before_weight, q3)
    metadata = get_forward_context()
    _check_metadata(metadata, q.device)
    backend = select_backend(q.device)
    if backend == "flash_attn" and not supports_block_size(kv_cache.shape[2]):
        logger.debug("flash_attn needs block_size %% 256 == 0, got %d; using triton", kv_cache.shape[2])
        backend = "triton"
    if backend == "reference":
        if rope is not None:
            q3, k3 = rope.apply(q3, k3)
        out = paged_attention_reference(q3, k3, v3, kv_cache, scale, metadata)  # [T, Hq, D]
    else:
        out = _run_triton(q3, k3, v3, kv_cache, scale, metadata, use_flash=backend == "flash_attn", rope=rope)
    return out.reshape(q.shape)


def _rope(cos, sin, qk_norm, q_weight, k_weight, q_eps, k_eps, q_cast, k_cast, q3: Tensor) -> Rope | None:
    if cos is None and sin is None:
        if qk_norm:
            raise ValueError("paged_attention: qk_norm=True needs cos and sin")
        return None
    if cos is None or sin is None or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != q3.shape[0] \
            or not 0 < 2 * cos.shape[1] <= q3.shape[2]:
        raise ValueError(f"paged_attention: cos and sin must both be [T={q3.shape[0]}, R/2] with R <= "
                         f"head_dim={q3.shape[2]}, got {None if cos is None else tuple(cos.shape)} and "
                         f"{None if sin is None else tuple(sin.shape)}")
    return Rope(cos, sin, qk_norm, q_weight, k_weight, q_eps, k_eps, q_cast, k_cast)


@paged_attention.register_fake
def _paged_attention_fake(q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float,
                          cos: Tensor | None = None, sin: Tensor | None = None, qk_norm: bool = False,
                          q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
                          q_norm_eps: float = 0.0, k_norm_eps: float = 0.0,
                          q_cast_before_weight: bool = False, k_cast_before_weight: bool = False) -> Tensor:
    q3, _, _ = _check_inputs(q, k, v, kv_cache)
    _rope(cos, sin, qk_norm, q_norm_weight, k_norm_weight, q_norm_eps, k_norm_eps, q_cast_before_weight,
          k_cast_before_weight, q3)
    return q.new_empty(q.shape)
