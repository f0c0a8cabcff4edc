"""End-to-end numerics: our flat-batch models vs Hugging Face on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

from infer.models import load_model
from infer.models.llama import LlamaForCausalLM
from infer.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=500000.0)

CASES = {
    "llama": ("llama", {}, LlamaForCausalLM),
    "llama_tied_llama3_rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                               LlamaForCausalLM),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True), LlamaForCausalLM),
    "mistral": ("mistral", dict(sliding_window=None), LlamaForCausalLM),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True), Qwen2ForCausalLM),
    "qwen3": ("qwen3", {}, Qwen3ForCausalLM),
}
PROMPT_LENS = (7, 13, 3)
ATOL, RTOL = 1e-5, 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_hf(hf_checkpoint, hf_logits, paged_runner, case):
    kind, overrides, expected_cls = CASES[case]
    hf_model, folder = hf_checkpoint(kind, **overrides)
    model, config = load_model(folder)
    assert type(model) is expected_cls
    assert config.architectures == hf_model.config.architectures

    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    runner = paged_runner(model)

    logits = runner.step(seqs, query_lens=list(PROMPT_LENS))  # one flat prefill, [sum(L), V]
    assert logits.shape == (sum(PROMPT_LENS), config.vocab_size)
    for seq, ours in zip(seqs, logits.split(list(PROMPT_LENS))):
        torch.testing.assert_close(ours, hf_logits(hf_model, seq), atol=ATOL, rtol=RTOL)

    last = logits[torch.tensor(PROMPT_LENS).cumsum(0) - 1]  # [B, V]
    seqs = [seq + [int(tok)] for seq, tok in zip(seqs, last.argmax(-1))]
    logits = runner.step(seqs, query_lens=[1] * len(seqs))  # one decode step, [B, V]
    expected = torch.stack([hf_logits(hf_model, seq)[-1] for seq in seqs])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_greedy_generation_matches_hf(hf_checkpoint, paged_runner):
    hf_model, folder = hf_checkpoint("qwen3")
    model, _ = load_model(folder)
    prompt = [5, 17, 42, 99, 3]
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    runner = paged_runner(model)
    seq = list(prompt)
    logits = runner.step([seq], [len(seq)])
    for _ in range(8):
        seq.append(int(logits[-1].argmax()))
        logits = runner.step([seq], [1])
    assert seq[len(prompt):] == expected


def test_tied_head_shares_the_embedding(hf_checkpoint):
    _, folder = hf_checkpoint("llama", tie_word_embeddings=True)
    model, _ = load_model(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_load_runs(hf_checkpoint, hf_logits, paged_runner):
    hf_model, folder = hf_checkpoint("llama")
    model, _ = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = paged_runner(model).step([[1, 2, 3, 4]], [4])
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), hf_logits(hf_model, [1, 2, 3, 4]), atol=5e-2, rtol=5e-2)
