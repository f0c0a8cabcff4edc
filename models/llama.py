"""Llama-family decoder (Llama, SmolLM2, Mistral) on flat token batches, with HF parameter names.

``model(input_ids [T], positions [T]) -> hidden [T, H]`` runs every new token of every sequence
in one flat batch; paged attention finds the sequences through the forward context.
``model.compute_logits(hidden [N, H]) -> [N, V]`` is separate so the engine computes logits only
for the rows it samples. Qwen2/Qwen3 reuse these classes through :class:`AttentionOptions`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.attention import Attention
from ..runtime import ops  # noqa: F401  (registers torch.ops.infer.rotary_embedding)
from .layers.embedding import ParallelLMHead, VocabParallelEmbedding
from .layers.linear import ColumnParallelLinear, RowParallelLinear, resolve_tp
from .layers.norm import RMSNorm
from .layers.rotary import get_rope, split_cos_sin
from .stages import Stages

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttentionOptions:
    """Per-architecture differences of the attention block."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE


@dataclass(frozen=True, slots=True)
class TPPlacement:
    """This rank's position in the tensor-parallel group."""

    rank: int
    size: int


def head_dim_of(config: Any) -> int:
    """``config.head_dim`` if set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Separate q/k/v projections, RoPE, paged attention and the output projection."""

    def __init__(self, config: Any, options: AttentionOptions, tp: TPPlacement) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        if total_heads % tp.size != 0:
            raise ValueError(f"num_attention_heads={total_heads} is not divisible by tp_size={tp.size}")
        if total_kv % tp.size != 0 and tp.size % total_kv != 0:
            raise ValueError(f"num_key_value_heads={total_kv} and tp_size={tp.size}: one must divide the other")
        self.head_dim = head_dim_of(config)
        self.num_heads = total_heads // tp.size
        self.num_kv_heads = max(1, total_kv // tp.size)
        kv_replicas = max(1, tp.size // total_kv)
        tp_args = dict(tp_rank=tp.rank, tp_size=tp.size)
        d = self.head_dim
        self.q_proj = ColumnParallelLinear(hidden, total_heads * d, options.qkv_bias, **tp_args)
        self.k_proj = ColumnParallelLinear(hidden, total_kv * d, options.qkv_bias, num_replicas=kv_replicas, **tp_args)
        self.v_proj = ColumnParallelLinear(hidden, total_kv * d, options.qkv_bias, num_replicas=kv_replicas, **tp_args)
        self.o_proj = RowParallelLinear(total_heads * d, hidden, options.o_bias, **tp_args)
        self.qk_norm = options.qk_norm
        if options.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, scale=d**-0.5)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(hidden).view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(hidden).view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(hidden)  # [T, Hkv*D]
        if self.qk_norm:
            q = self.q_norm(q)  # [T, Hq, D]
            k = self.k_norm(k)  # [T, Hkv, D]
        q, k = torch.ops.infer.rotary_embedding(q, k, cos, sin)  # apply_rotary on each, one kernel
        out = self.attn(q.flatten(1), k.flatten(1), v)  # [T, Hq*D]
        return self.o_proj(out)  # [T, H]


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with separate gate and up projections."""

    def __init__(self, config: Any, tp: TPPlacement) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; only 'silu' is")
        bias = bool(getattr(config, "mlp_bias", False))
        hidden, inter = config.hidden_size, config.intermediate_size
        tp_args = dict(tp_rank=tp.rank, tp_size=tp.size)
        self.gate_proj = ColumnParallelLinear(hidden, inter, bias, **tp_args)
        self.up_proj = ColumnParallelLinear(hidden, inter, bias, **tp_args)
        self.down_proj = RowParallelLinear(inter, hidden, bias, **tp_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, H]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual adds.

    The residual stream crosses layer boundaries un-added, as ``(hidden, residual)``: a layer
    first adds them, so each add lands next to the RMSNorm that reads it (one fused op) even
    when every layer is compiled on its own (see :meth:`LlamaModel.run_stages`).
    """

    def __init__(self, config: Any, options: AttentionOptions, tp: TPPlacement) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, options, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor,
                cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual) [T, H] each, cos_sin [T, rot] -> (mlp output, residual)``: the
        stream is their sum."""
        cos, sin = split_cos_sin(cos_sin)  # [T, rot/2] each
        hidden = hidden + residual
        residual = hidden
        hidden = self.self_attn(self.input_layernorm(hidden), cos, sin)  # [T, H]
        hidden = hidden + residual
        residual = hidden
        hidden = self.mlp(self.post_attention_layernorm(hidden))  # [T, H]
        return hidden, residual


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm: ``(ids [T], positions [T]) -> hidden [T, H]``."""

    def __init__(self, config: Any, options: AttentionOptions, tp: TPPlacement) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_rank=tp.rank, tp_size=tp.size
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, options, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim_of(config))

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [T], positions [T]) -> (embeddings, zero residual) [T, H], cos_sin [T, rot]``."""
        hidden = self.embed_tokens(input_ids)  # [T, H]
        return hidden, torch.zeros_like(hidden), self.rotary_emb.cos_sin(positions)  # x + 0 == x

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final norm of the residual stream: ``[T, H] x 2 -> [T, H]``."""
        return self.norm(hidden + residual)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.run_stages(input_ids, positions, self.stages)

    @property
    def stages(self) -> Stages:
        """The plain functions of the three stages; :meth:`run_stages` may get compiled ones."""
        return Stages(LlamaModel.prepare, LlamaDecoderLayer.forward, LlamaModel.finish)

    def run_stages(self, input_ids: torch.Tensor, positions: torch.Tensor, stages: Stages) -> torch.Tensor:
        """``(ids [T], positions [T]) -> hidden [T, H]`` through ``stages``: one ``layer`` function
        serves every decoder layer, so an engine compiles one graph for all of them."""
        hidden, residual, cos_sin = stages.prepare(self, input_ids, positions)
        for layer in self.layers:
            hidden, residual = stages.layer(layer, hidden, residual, cos_sin)  # [T, H] each
        return stages.finish(self, hidden, residual)  # [T, H]


def _warn_unsupported_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    enabled = getattr(config, "use_sliding_window", True)
    if enabled and window is not None and window < config.max_position_embeddings:
        logger.warning(
            "sliding_window=%d is not applied: attention is full-context, so outputs differ from the "
            "reference for sequences longer than %d tokens", window, window
        )


class LlamaForCausalLM(nn.Module):
    """Causal LM; subclasses change only :meth:`attention_options`."""

    def __init__(self, config: Any, *, tp_rank: int | None = None, tp_size: int | None = None) -> None:
        super().__init__()
        rank, size = resolve_tp(tp_rank, tp_size)
        tp = TPPlacement(rank, size)
        _warn_unsupported_window(config)
        self.config = config
        self.model = LlamaModel(config, self.attention_options(config), tp)
        tie_to = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, tie_to=tie_to, tp_rank=rank, tp_size=size
        )

    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        """Llama/Mistral: one ``attention_bias`` flag for q/k/v and o."""
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids [T] int64, positions [T] int64 -> hidden [T, H]``."""
        return self.model(input_ids, positions)

    @property
    def stages(self) -> Stages:
        return self.model.stages

    def run_stages(self, input_ids: torch.Tensor, positions: torch.Tensor, stages: Stages) -> torch.Tensor:
        """:meth:`forward` with each stage run by ``stages`` (see :meth:`LlamaModel.run_stages`)."""
        return self.model.run_stages(input_ids, positions, stages)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, H] -> logits [N, V]`` (full vocabulary on every rank)."""
        return self.lm_head(hidden)
