"""Rotary position embedding (neox / ``rotate_half`` layout) configured from a Hugging Face config.

The inverse frequencies are computed the way ``transformers.modeling_rope_utils`` does (fp32,
``arange(0, dim, 2) / dim``), and cos/sin come from an fp32 elementwise product of positions and
inverse frequencies, scaled by the attention factor and cast to the activation dtype at use —
so in fp32 the result is bit-identical to HF's ``apply_rotary_pos_emb``.

``partial_rotary_factor`` rotates only the first ``int(head_dim * factor)`` dims of each head.
(HF's *default* rope for Llama/Qwen ignores the factor; those checkpoints never set it.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
DEFAULT_ROPE_THETA = 10000.0


def rope_parameters(config: Any) -> dict[str, Any]:
    """Flat rope settings of ``config``: transformers 5.x ``rope_parameters`` or legacy fields.

    Always holds ``rope_type``, ``rope_theta`` and ``partial_rotary_factor``.
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type rope parameters are not supported, got keys {sorted(params)}")
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", None) or 1.0
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    """``1 / base^(2i/dim)`` in fp32 on CPU, as HF computes it.  # [dim/2]"""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    return 1.0 / (base**exponent)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: Mapping[str, Any], max_pos: int) -> torch.Tensor:
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params.get("original_max_position_embeddings") or max_pos
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq  # [dim/2]
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(params: Mapping[str, Any], dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base = params["rope_theta"]
    old_len = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / old_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as HF does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # [dim/2]
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)  # [dim/2]
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def compute_inv_freq(params: Mapping[str, Any], rot_dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rot_dim/2]`` (fp32, CPU) and the cos/sin scaling for ``params``.

    ``dynamic`` (NTK) is approximated by the default frequencies: HF's dynamic scaling only
    changes them once a sequence exceeds ``max_position_embeddings``, which this cache never does.
    """
    rope_type = params["rope_type"]
    base = params["rope_theta"]
    if rope_type in ("default", "dynamic"):
        return _base_inv_freq(base, rot_dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, rot_dim) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, rot_dim), params, max_pos), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, rot_dim, max_pos)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Holds ``cos_sin_cache [max_pos, rot_dim]`` (cos half | sin half, fp32, scaled).

    ``forward(positions [T]) -> (cos, sin)`` each ``[T, rot_dim/2]``; apply them to q and k with
    ``torch.ops.infer.rotary_embedding``, which computes :func:`apply_rotary` on each.
    """

    def __init__(self, head_dim: int, rot_dim: int, max_position: int, inv_freq: torch.Tensor, scaling: float = 1.0):
        super().__init__()
        if rot_dim % 2 or not 0 < rot_dim <= head_dim:
            raise ValueError(f"rotary dim must be even and in (0, head_dim={head_dim}], got {rot_dim}")
        if inv_freq.shape != (rot_dim // 2,):
            raise ValueError(f"inv_freq must have shape ({rot_dim // 2},), got {tuple(inv_freq.shape)}")
        if max_position < 1:
            raise ValueError(f"max_position must be positive, got {max_position}")
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.max_position = max_position
        positions = torch.arange(max_position, device="cpu").to(torch.float32)  # [P]
        freqs = positions[:, None] * inv_freq.to(torch.float32)[None, :]  # [P, rot/2]
        cache = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)  # [P, rot]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_cos_sin(self.cos_sin(positions))

    def cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions [T] -> [T, rot]``: cos then sin, one fresh tensor (see :func:`split_cos_sin`)."""
        return self.cos_sin_cache[positions]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, max_position={self.max_position}"


def split_cos_sin(cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, rot] -> (cos, sin) [T, rot/2]`` views."""
    cos, sin = cos_sin.chunk(2, dim=-1)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by ``cos/sin [T, rot/2]`` (neox layout, first ``rot`` dims of D).

    Equals HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` on the rotated dims. The
    reference that ``infer::rotary_embedding`` (:mod:`infer.runtime.ops.rotary`) reproduces bit for bit.
    """
    half = cos.shape[-1]
    cos = cos.unsqueeze(1).to(x.dtype)  # [T, 1, rot/2]
    sin = sin.unsqueeze(1).to(x.dtype)  # [T, 1, rot/2]
    x1 = x[..., :half]  # [T, H, rot/2]
    x2 = x[..., half : 2 * half]  # [T, H, rot/2]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, H, rot]
    if 2 * half == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)  # [T, H, D]


def get_rope(config: Any, head_dim: int) -> RotaryEmbedding:
    """Build the rotary embedding an HF config describes."""
    params = rope_parameters(config)
    rot_dim = int(head_dim * params["partial_rotary_factor"])
    max_pos = config.max_position_embeddings
    inv_freq, scaling = compute_inv_freq(params, rot_dim, max_pos)
    return RotaryEmbedding(head_dim, rot_dim, max_pos, inv_freq, scaling)
