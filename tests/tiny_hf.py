"""Tiny random-weight Hugging Face models shared by the tests."""
from __future__ import annotations

import torch
import transformers

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, pad_token_id=0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, head_dim=16)),
    # q/k norms after transpose(1, 2): strided results that the model views as such
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_COMMON, head_dim=16, sliding_window=4)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(_COMMON, head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                   n_positions=256)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=96,
                                             max_position_embeddings=256)),
}


def tiny_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    config_name, model_name, kwargs = CONFIGS[name]
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager" if name == "bert" else "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial norm weights so that a wrong fusion shows in the numbers
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if not isinstance(model, transformers.BertModel) \
        else model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CAUSAL_LM = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
CAUSAL_LM_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)


def make_hf_model(kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny fp32 HF causal LM (eager attention) with random biases and non-unit norm weights."""
    config_name, model_name = CAUSAL_LM[kind]
    config = getattr(transformers, config_name)(**{**CAUSAL_LM_TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def word_tokenizer(words: list[str], chat_template: str | None = None):
    """A whitespace word-level tokenizer whose ids are the positions in `words` (<unk> <s> </s> first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", chat_template=chat_template)
