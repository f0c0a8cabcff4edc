"""More Hugging Face architectures under backend="infer": eager's logits, whatever the passes fuse.

Each has something the Llama family lacks: post-norms (OLMo 2), residual/embedding/logit
multipliers (Granite), LayerNorm and partial rotary (StableLM, Phi, Nemotron), parallel blocks
(Cohere, Phi, Falcon), experts (Mixtral, Qwen2-MoE, Qwen3-MoE), sliding windows (Mistral, Gemma 2),
softcapping (Gemma 2), 1 + w norms (Gemma 2). The fusion counts of the common families are
pinned in ``test_whole_models.py``; here only the numbers are, so a pass that fuses something it
should not shows up as a wrong logit or an error.
"""
import pytest
import torch
import transformers

import infer.compiler as ic

_C = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=256)
MORE = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_C)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_C, residual_multiplier=0.3, embedding_multiplier=2.0, attention_multiplier=0.2, logits_scaling=3.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_C)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_C)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_C)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_C, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_C, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_C, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(_C, head_dim=16)),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(_C, sliding_window=4)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_C, head_dim=16, sliding_window=4)),
}


def _model(name):
    config_name, model_name, kwargs = MORE[name]
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager" if name == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so that a wrong fusion shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(MORE))
def test_logits_match_eager(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 11))
    torch._dynamo.reset()  # this model's own compile report
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="infer", options={"inner_compiler": "eager"})
        actual = compiled(input_ids=ids, use_cache=False).logits
    assert ic.last_report().fusions, "the passes fused nothing: the test would not exercise them"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
