"""Hugging Face baselines and random checkpoints: the paths a transformers user has today.

- ``hf-eager``: ``transformers.Qwen3ForCausalLM`` in bf16, a ``DynamicCache`` filled with
  ``context`` random tokens per layer; each timed step decodes one token per sequence, then
  ``cache.crop(-1)`` puts the cache back at ``context`` (outside the timed region).
- ``hf-static-compiled``: a ``StaticCache`` of ``context + 16`` slots and
  ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``; the cache's length is
  reset to ``context`` after each step. Written for transformers 4.5x and 5.x (keyword and
  ``cache_position`` differences are probed, not assumed).

:func:`save_checkpoint` writes a random-weight model plus a word-level tokenizer (``<unk> <s> </s>
w3 w4 ...``, one word per id) that ``infer.LLM`` can load.
"""
from __future__ import annotations

import copy
import inspect
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from ..models.loader import default_dtype
from .harness import median_ms

logger = logging.getLogger(__name__)

STATIC_SLACK = 16  # free slots after `context` in the static cache
WARMUP_CALLS = 3  # compile + CUDA-graph warm-up and record happen in these


def build_hf_model(cfg: Any, device: str) -> torch.nn.Module:
    """A random bf16 ``transformers.Qwen3ForCausalLM`` (HF's own init, std 0.02) in eval mode."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg._attn_implementation = "sdpa"
    with torch.device(device), default_dtype(torch.bfloat16):
        model = transformers.Qwen3ForCausalLM(cfg)
    if next(model.parameters()).dtype != torch.bfloat16:  # a transformers that ignored the default dtype
        model = model.to(dtype=torch.bfloat16)
    return model.to(device=device).eval()


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def save_checkpoint(cfg: Any, folder: str | Path, device: str) -> Path:
    """Random bf16 weights (safetensors), ``config.json`` and a tokenizer in ``folder``."""
    folder = Path(folder)
    start = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2  # the tokenizer's <s> and </s>
    model = build_hf_model(cfg, device)
    model.save_pretrained(folder)
    del model
    make_tokenizer(cfg.vocab_size).save_pretrained(folder)
    logger.info("random checkpoint in %s (%.1f s)", folder, time.perf_counter() - start)
    return folder


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def dynamic_cache(cfg: Any, batch: int, context: int, device: str):
    """A ``DynamicCache`` holding ``context`` random bf16 tokens in every layer."""
    try:
        cache = transformers.DynamicCache(config=cfg)
    except TypeError:  # older transformers: no config argument
        cache = transformers.DynamicCache()
    shape = (batch, cfg.num_key_value_heads, context, _head_dim(cfg))  # [B, Hkv, S, D]
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, device=device, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def static_cache(cfg: Any, batch: int, max_len: int, device: str):
    """A preallocated ``StaticCache`` (5.x ignores the 4.x keywords; 4.x needs them)."""
    cache = transformers.StaticCache(config=cfg, max_batch_size=batch, max_cache_len=max_len, device=device,
                                     dtype=torch.bfloat16)
    layers = getattr(cache, "layers", None) or []
    if hasattr(cache, "early_initialization") and any(not getattr(l, "is_initialized", True) for l in layers):
        cache.early_initialization(batch, cfg.num_key_value_heads, _head_dim(cfg), torch.bfloat16,
                                   torch.device(device))
    return cache


def set_length(cache: Any, length: int) -> None:
    """Make a 5.x static cache hold ``length`` tokens again (4.x places by ``cache_position``)."""
    for layer in getattr(cache, "layers", None) or []:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def _step_kwargs(model, cache, batch: int, context: int, device: str) -> dict[str, Any]:
    ids = torch.randint(0, min(1000, model.config.vocab_size), (batch, 1), device=device)  # [B, 1]
    kwargs = dict(input_ids=ids, position_ids=torch.full((batch, 1), context, device=device),  # [B, 1]
                  past_key_values=cache, use_cache=True)
    if "cache_position" in inspect.signature(model.forward).parameters:  # transformers 4.x
        kwargs["cache_position"] = torch.tensor([context], device=device)
    return kwargs


def _timed(call: Callable[[], Any], reset: Callable[[], None], steps: int, device: str) -> tuple[float, float]:
    """``(median ms of call(), seconds of the warm-up calls)``; ``reset()`` runs between calls, untimed."""
    start = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        call()
        reset()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    startup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        times.append(median_ms(call, device, 1, warmup=0))
        reset()
    return statistics.median(times), startup


@torch.inference_mode()
def time_hf_eager(model, batch: int, context: int, steps: int, device: str) -> tuple[float, float]:
    cache = dynamic_cache(model.config, batch, context, device)
    kwargs = _step_kwargs(model, cache, batch, context, device)
    return _timed(lambda: model(**kwargs), lambda: cache.crop(-1), steps, device)


@torch.inference_mode()
def time_hf_static_compiled(model, batch: int, context: int, steps: int, device: str,
                            fullgraph: bool = True) -> tuple[float, float]:
    torch._dynamo.reset()
    cache = static_cache(model.config, batch, context + STATIC_SLACK, device)
    set_length(cache, context)
    kwargs = _step_kwargs(model, cache, batch, context, device)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=fullgraph)
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def call():
        mark_step()
        return forward(**kwargs)

    try:
        return _timed(call, lambda: set_length(cache, context), steps, device)
    finally:
        torch._dynamo.reset()
