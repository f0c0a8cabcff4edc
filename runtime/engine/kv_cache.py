"""Size and allocate the paged KV cache: one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer.

On CUDA the number of blocks comes from the memory left after a profile forward run at the
largest step size (``max_num_batched_tokens``), within ``gpu_memory_utilization`` of the GPU;
on CPU it comes from ``cpu_kv_cache_bytes``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..attention import Attention
from .config import EngineConfig

logger = logging.getLogger(__name__)

MiB = 2**20


def attention_layers(model: nn.Module) -> list[Attention]:
    """Every paged-attention layer of ``model``, in module order."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no infer.runtime.attention.Attention layer to bind a KV cache to")
    return layers


def kv_block_bytes(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block summed over all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * layer.num_kv_heads * layer.head_dim * itemsize for layer in layers)


def bind_kv_cache(layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Allocate a zeroed cache of ``num_blocks`` blocks for every layer and bind it."""
    for layer in layers:
        shape = (2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.bind_kv_cache(torch.zeros(shape, dtype=dtype, device=device))  # [2, NB, bs, Hkv, D]


def release_kv_cache(layers: list[Attention]) -> None:
    """Bind empty caches so the old ones can be freed (e.g. after a profile run)."""
    for layer in layers:
        cache = layer.kv_cache
        layer.bind_kv_cache(cache.new_empty((2, 0, cache.shape[2], layer.num_kv_heads, layer.head_dim)))


def cpu_num_blocks(config: EngineConfig, block_bytes: int) -> int:
    """Blocks that fit in ``config.cpu_kv_cache_bytes``."""
    num_blocks = config.cpu_kv_cache_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(f"cpu_kv_cache_bytes={config.cpu_kv_cache_bytes} holds no KV block; one block of "
                         f"{config.block_size} tokens needs {block_bytes} bytes")
    return num_blocks


def cuda_num_blocks(config: EngineConfig, block_bytes: int, device: torch.device,
                    profile: Callable[[], None]) -> int:
    """Blocks that fit in the GPU memory left after weights and a profile run's activations."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - allocated
    budget = total * config.gpu_memory_utilization - (total - free) - activation_peak
    num_blocks = int(budget // block_bytes)
    if num_blocks < 1:
        raise ValueError(f"no GPU memory left for the KV cache: gpu_memory_utilization={config.gpu_memory_utilization} "
                         f"of {total / MiB:.0f} MiB, {(total - free) / MiB:.0f} MiB in use, profile run peak "
                         f"{activation_peak / MiB:.0f} MiB; raise gpu_memory_utilization or lower "
                         f"max_num_batched_tokens={config.max_num_batched_tokens}")
    return num_blocks


def init_kv_cache(model: nn.Module, config: EngineConfig, profile: Callable[[], None]) -> int:
    """Size, allocate and bind the KV cache of every attention layer; returns the number of blocks.

    ``profile`` runs one forward at the largest step size (used on CUDA only; it binds and
    releases its own temporary cache).
    """
    layers = attention_layers(model)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    block_bytes = kv_block_bytes(layers, config.block_size, dtype)
    if device.type == "cuda":
        num_blocks = cuda_num_blocks(config, block_bytes, device, profile)
    else:
        num_blocks = cpu_num_blocks(config, block_bytes)
    bind_kv_cache(layers, num_blocks, config.block_size, dtype, device)
    tokens = num_blocks * config.block_size
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB, %s on %s)", num_blocks,
                config.block_size, tokens, num_blocks * block_bytes / MiB, dtype, device)
    if tokens < config.max_model_len:
        logger.warning("the KV cache holds %d tokens, fewer than max_model_len=%d: longer sequences will fail",
                       tokens, config.max_model_len)
    return num_blocks
