"""Checkpoint loader: sharded files, tied heads, dtype choice and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from infer.models import ARCHITECTURES, load_model, model_class_for
from infer.models.loader import resolve_dtype

WEIGHTS = "model.safetensors"


def _edit_weights(folder, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def _assert_params_equal(model, hf_model) -> None:
    hf_state = hf_model.state_dict()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.data, hf_state[name], rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_loads_every_shard(hf_checkpoint):
    hf_model, folder = hf_checkpoint("qwen3", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    model, _ = load_model(folder)
    _assert_params_equal(model, hf_model)


def test_inv_freq_buffers_in_old_checkpoints_are_skipped(hf_checkpoint):
    hf_model, folder = hf_checkpoint("llama")
    _edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    model, _ = load_model(folder)
    _assert_params_equal(model, hf_model)


def test_tied_checkpoint_without_lm_head(hf_checkpoint):
    hf_model, folder = hf_checkpoint("qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(folder / WEIGHTS))
    model, _ = load_model(folder)
    torch.testing.assert_close(model.lm_head.weight.data, hf_model.lm_head.weight.data)


def test_dtype_choice(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    model, config = load_model(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert resolve_dtype(None, config) == torch.float32  # saved from an fp32 model
    assert resolve_dtype("auto", type("Cfg", (), {"dtype": "float16"})()) == torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype(torch.int8, config)
    with pytest.raises(ValueError, match="float42"):
        resolve_dtype("float42", config)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_no_safetensors(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(folder)


def test_unknown_architecture(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*supported: .*Qwen3ForCausalLM"):
        load_model(folder)
    assert model_class_for(type("Cfg", (), {"architectures": ["MistralForCausalLM"]})()) \
        is ARCHITECTURES["LlamaForCausalLM"]


def test_shape_mismatch_names_the_tensor(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_weights(folder, lambda t: t.update({name: torch.zeros(95, 64)}))
    with pytest.raises(ValueError, match=rf"{name}.*expected \(96, 64\), got \(95, 64\)"):
        load_model(folder)


def test_missing_weights_are_listed(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_weights(folder, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing 1 weights: {name}"):
        load_model(folder)


def test_unexpected_weights_are_listed(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    _edit_weights(folder, lambda t: t.update({"model.layers.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected weights: model.layers.0.adapter.weight"):
        load_model(folder)
