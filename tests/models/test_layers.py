"""Layer checks: RoPE and RMSNorm against HF bit for bit, tensor-parallel shard loading."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from infer.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from infer.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from infer.models.layers.norm import RMSNorm
from infer.models.layers.rotary import apply_rotary, get_rope, rope_parameters
from infer.models.llama import LlamaForCausalLM

ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    "linear_partial": dict(rope_type="linear", factor=2.0, rope_theta=10000.0, partial_rotary_factor=0.5),
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32, rope_theta=500000.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0),
}


def _llama_config(**kwargs) -> LlamaConfig:
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    return LlamaConfig(**{**base, **kwargs})


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_cos_sin_match_hf_exactly(name):
    config = _llama_config(rope_parameters=dict(ROPES[name]))
    positions = torch.tensor([0, 1, 2, 17, 31, 64, 127])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])  # [1, T, rot]
    rope = get_rope(config, head_dim=32)
    cos, sin = rope(positions)  # [T, rot/2]
    assert rope.rot_dim == hf_cos.shape[-1]
    torch.testing.assert_close(cos, hf_cos[0, :, : rope.rot_dim // 2], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, : rope.rot_dim // 2], rtol=0, atol=0)


def test_apply_rotary_matches_hf_exactly():
    config = _llama_config()
    positions = torch.arange(9)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
    q, k = torch.randn(9, 4, 32), torch.randn(9, 2, 32)  # [T, H, D]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos[0], hf_sin[0], unsqueeze_dim=1)
    cos, sin = get_rope(config, 32)(positions)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k, rtol=0, atol=0)


def test_partial_rotary_leaves_the_tail_alone():
    config = _llama_config(rope_parameters=dict(ROPES["linear_partial"]))
    rope = get_rope(config, 32)
    assert rope.rot_dim == 16
    x = torch.randn(5, 2, 32)
    out = apply_rotary(x, *rope(torch.arange(5)))
    torch.testing.assert_close(out[..., 16:], x[..., 16:], rtol=0, atol=0)


def test_legacy_rope_fields_are_read():
    legacy = SimpleNamespace(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0},
                             max_position_embeddings=64)
    params = rope_parameters(legacy)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 5000.0
    new = _llama_config(max_position_embeddings=64,
                        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=5000.0))
    torch.testing.assert_close(get_rope(legacy, 32).cos_sin_cache, get_rope(new, 32).cos_sin_cache)


def test_unsupported_rope_type_is_rejected():
    config = SimpleNamespace(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4},
                             max_position_embeddings=64)
    with pytest.raises(ValueError, match="longrope"):
        get_rope(config, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype):
    ours, theirs = RMSNorm(64, 1e-5), LlamaRMSNorm(64, 1e-5)
    weight = torch.randn(64)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = torch.randn(7, 64, dtype=dtype)
    torch.testing.assert_close(ours.to(dtype)(x), theirs.to(dtype)(x), rtol=0, atol=0)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_full(tp_size):
    w, b, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    outs = []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(6, 8, bias=True, tp_rank=rank, tp_size=tp_size)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert layer.weight.shape == (8 // tp_size, 6)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))


def test_column_parallel_replicas_share_a_shard():
    w = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)  # 2 kv heads of head_dim 2
    shards = []
    for rank in range(4):
        layer = ColumnParallelLinear(3, 4, tp_rank=rank, tp_size=4, num_replicas=2)
        layer.weight.weight_loader(layer.weight, w)
        shards.append(layer.weight.clone())
    torch.testing.assert_close(shards[0], w[:2])
    torch.testing.assert_close(shards[1], w[:2])
    torch.testing.assert_close(shards[3], w[2:])


def test_row_parallel_partial_sums_add_up():
    w, b, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    partial = torch.zeros(3, 5)
    for rank in range(2):
        layer = RowParallelLinear(8, 5, bias=True, tp_rank=rank, tp_size=2)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        torch.testing.assert_close(layer.bias.data, b)  # whole bias on every rank, added once
        partial += F.linear(x[:, rank * 4:(rank + 1) * 4], layer.weight)
    torch.testing.assert_close(partial + b, F.linear(x, w, b))


def test_vocab_parallel_embedding_and_head_pad_the_last_rank():
    table, ids, hidden = torch.randn(10, 4), torch.tensor([0, 3, 4, 9, 8]), torch.randn(2, 4)
    embedded, logits = torch.zeros(5, 4), []
    for rank in range(3):  # 10 rows over 3 ranks: 4, 4, 2 (+2 zero rows)
        emb = VocabParallelEmbedding(10, 4, tp_rank=rank, tp_size=3)
        emb.weight.weight_loader(emb.weight, table)
        head = ParallelLMHead(10, 4, tie_to=emb, tp_rank=rank, tp_size=3)
        embedded += emb(ids)  # at world size 1 the all-reduce is a no-op: sum by hand
        logits.append(head(hidden))
    torch.testing.assert_close(emb.weight.data[2:], torch.zeros(2, 4))
    torch.testing.assert_close(embedded, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :10], hidden @ table.T)


def test_weight_loader_rejects_wrong_shapes():
    layer = ColumnParallelLinear(6, 8, tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"expected \(8, 6\), got \(8, 5\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(8, 5))
    emb = VocabParallelEmbedding(10, 4)
    with pytest.raises(ValueError, match=r"expected \(10, 4\)"):
        emb.weight.weight_loader(emb.weight, torch.randn(11, 4))


@pytest.mark.parametrize("rank,size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_or_size_is_rejected(rank, size):
    with pytest.raises(ValueError, match="tp_"):
        ColumnParallelLinear(4, 4, tp_rank=rank, tp_size=size)


def test_model_heads_per_rank_and_kv_replication():
    config = _llama_config(num_hidden_layers=1)  # 4 q heads, 2 kv heads
    for rank in range(4):
        attn = LlamaForCausalLM(config, tp_rank=rank, tp_size=4).model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (1, 1)
        assert attn.k_proj.shard == rank // 2
        assert attn.o_proj.weight.shape == (64, 32)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        LlamaForCausalLM(config, tp_rank=0, tp_size=3)
