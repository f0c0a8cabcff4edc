"""``infer::rope_paged_attention``: the q/k norms and rotary, then paged attention, as one op.

Schema::

    infer::rope_paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale,
        Tensor cos, Tensor sin, bool qk_norm, Tensor? q_weight, float q_eps, bool q_cast_before_weight,
        ScalarType q_dtype, Tensor? k_weight, float k_eps, bool k_cast_before_weight, ScalarType k_dtype)
        -> Tensor

is exactly::

    q2, k2 = qk_norm_rotary(q, q_weight, ..., k, k_weight, ..., cos, sin)   # qk_norm
    q2, k2 = rotary_embedding(q, k, cos, sin)                                # not qk_norm (norm args unused)
    out = paged_attention(q2.flatten(1), k2.flatten(1), v, kv_cache, scale)   # [T, Hq*D]

with ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv*D]`` (or 3-d). The ``rope_attention``
pass puts it where a model's rotary feeds only the attention. A uniform decode step on the
Triton backend runs one kernel: each decode program norms and rotates its own q rows, and the
program that stores the new k row rotates it first (see ``decode_attention_with_kv_write``); so
the separate q/k kernel and its launch are saved. Every other step runs the chain above.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .context import get_forward_context
from .op import SUPPORTED_HEAD_DIMS, select_backend

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _check(q: Tensor, k: Tensor, kv_cache: Tensor, cos: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or kv_cache.dim() != 5:
        raise ValueError(f"rope_paged_attention needs q [T, Hq, D], k [T, Hkv, D] and a 5-d kv_cache, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(kv_cache.shape)}")
    if cos.dim() != 2:
        raise ValueError(f"rope_paged_attention needs cos/sin [T, R/2], got {tuple(cos.shape)}")


def _can_fuse(q: Tensor, k: Tensor, kv_cache: Tensor, cos: Tensor, sin: Tensor, qk_norm: bool,
              q_dtype: torch.dtype, k_dtype: torch.dtype, md) -> bool:
    """Whether this step is a uniform decode that the one-kernel path computes exactly."""
    from ..kernels import attention_triton as kernels
    dtype = kv_cache.dtype
    return (select_backend(q.device) == "triton" and md.is_uniform_decode and q.shape[0] == md.num_seqs
            and kernels.fuse_kv_write() and q.shape[2] in SUPPORTED_HEAD_DIMS and dtype in _FUSED_DTYPES
            and q.dtype == k.dtype == dtype and (not qk_norm or q_dtype == k_dtype == dtype)
            and cos.stride(1) == 1 and sin.stride(1) == 1 and 0 < 2 * cos.shape[1] <= q.shape[2])


@torch.library.custom_op("infer::rope_paged_attention", mutates_args=("kv_cache",))
def rope_paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, scale: float, cos: Tensor, sin: Tensor, qk_norm: bool,
    q_weight: Tensor | None, q_eps: float, q_cast_before_weight: bool, q_dtype: torch.dtype,
    k_weight: Tensor | None, k_eps: float, k_cast_before_weight: bool, k_dtype: torch.dtype,
) -> Tensor:
    """Norms + rotary on q/k, then ``infer::paged_attention`` (see the module docstring)."""
    _check(q, k, kv_cache, cos)
    md = get_forward_context()
    if _can_fuse(q, k, kv_cache, cos, sin, qk_norm, q_dtype, k_dtype, md) \
            and md.slot_mapping.device == q.device:
        from ..kernels import attention_triton as kernels
        from ..kernels.rotary_triton import NormArgs, RopeArgs
        norms = (NormArgs(q_weight, q_eps, q_cast_before_weight, q_dtype),
                 NormArgs(k_weight, k_eps, k_cast_before_weight, k_dtype)) if qk_norm else (None, None)
        v3 = v.unflatten(1, (k.shape[1], k.shape[2])) if v.dim() == 2 else v
        out = kernels.decode_attention_with_kv_write(
            q, k, v3, kv_cache, md.slot_mapping, md.seq_lens, md.block_tables, scale, rope=RopeArgs(cos, sin, *norms))
        return out.flatten(1)  # [T, Hq*D]
    infer = torch.ops.infer
    if qk_norm:
        q2, k2 = infer.qk_norm_rotary(q, q_weight, q_eps, q_cast_before_weight, q_dtype,
                                      k, k_weight, k_eps, k_cast_before_weight, k_dtype, cos, sin)
    else:
        q2, k2 = infer.rotary_embedding(q, k, cos, sin)
    return infer.paged_attention(q2.flatten(1), k2.flatten(1), v, kv_cache, scale)


@rope_paged_attention.register_fake
def _rope_paged_attention_fake(q, k, v, kv_cache, scale, cos, sin, qk_norm, q_weight, q_eps, q_cast_before_weight,
                               q_dtype, k_weight, k_eps, k_cast_before_weight, k_dtype):
    _check(q, k, kv_cache, cos)
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=q_dtype if qk_norm else q.dtype)
