"""Streamed checkpoint loading (``stream_weights``): bit-exact weights through tiny staging buffers,
tied weights, untouched buffers, tensor-parallel shards, every dtype, errors, and CUDA vs CPU."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from infer.models import load_model
from infer.models import streaming
from infer.models.qwen import Qwen3ForCausalLM
from infer.runtime import distributed

WEIGHTS = "model.safetensors"
TINY_STAGING = 4096  # bytes: the 256 x 64 embedding (64 KiB in fp32) goes through in 16 pieces


@pytest.fixture
def tiny_staging():
    """Two 4 KiB staging buffers, two read threads splitting reads down to 1 KiB."""
    return streaming.StagingConfig(buffer_bytes=TINY_STAGING, buffers=2, read_threads=2, min_read_bytes=1024)


def test_staging_config_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match=r"StagingConfig.buffers must be a positive int, got 0"):
        streaming.StagingConfig(buffers=0)
    with pytest.raises(ValueError, match=r"StagingConfig.buffer_bytes must be a positive int, got -1"):
        streaming.StagingConfig(buffer_bytes=-1)


def _rewrite(folder, dtype: torch.dtype | None = None, edit=None) -> dict[str, torch.Tensor]:
    """Re-save the checkpoint (cast to ``dtype``, then ``edit(tensors)``); returns what was saved."""
    tensors = load_file(str(folder / WEIGHTS))
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so that equality is bit for bit, for every dtype)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert torch.equal(_bits(actual), _bits(expected)), f"{name} differs from the checkpoint"


def _assert_matches_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter (tied ones through the name the checkpoint holds) equals its tensor bit for bit."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in tensors:
            _assert_bits_equal(param.data, tensors[name], name)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in tensors}
    assert {id(p) for p in model.parameters()} <= loaded  # no parameter left as allocated


def _no_reader_threads() -> bool:
    return not any(t.name.startswith("infer-weight-") for t in threading.enumerate())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_equal_the_checkpoint_bit_for_bit(hf_checkpoint, tiny_staging, dtype, monkeypatch):
    _, folder = hf_checkpoint("qwen3", attention_bias=True)
    tensors = _rewrite(folder, dtype)
    assert max(t.numel() * t.element_size() for t in tensors.values()) > 4 * TINY_STAGING
    plan, chunk_sizes = streaming._plan_chunks, []
    monkeypatch.setattr(streaming, "_plan_chunks",
                        lambda entries, size: chunk_sizes.append(size) or plan(entries, size))
    model, _ = load_model(folder, dtype=dtype, fast=True, staging=tiny_staging)
    assert chunk_sizes == [TINY_STAGING]  # load_model's staging reached the reads: big tensors went in pieces
    _assert_matches_checkpoint(model, tensors)
    simple, _ = load_model(folder, dtype=dtype, fast=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), simple.state_dict().items()):
        _assert_bits_equal(a, b, name)  # buffers included
    assert _no_reader_threads()


def test_sharded_checkpoint_and_casting(hf_checkpoint, tiny_staging):
    hf_model, folder = hf_checkpoint("llama", max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    model, _ = load_model(folder, dtype=torch.bfloat16, fast=True, staging=tiny_staging)  # fp32 checkpoint cast on load
    for name, param in model.named_parameters():
        _assert_bits_equal(param.data, hf_model.state_dict()[name].to(torch.bfloat16), name)


def test_tied_weights_stay_tied(hf_checkpoint, tiny_staging):
    _, folder = hf_checkpoint("qwen2", tie_word_embeddings=True)
    tensors = _rewrite(folder, torch.bfloat16)
    assert "lm_head.weight" not in tensors
    model, _ = load_model(folder, dtype=torch.bfloat16, fast=True, staging=tiny_staging)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_bits_equal(model.lm_head.weight.data, tensors["model.embed_tokens.weight"], "lm_head.weight")


def test_buffers_equal_a_freshly_built_model(hf_checkpoint, tiny_staging):
    _, folder = hf_checkpoint("qwen3", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                            original_max_position_embeddings=32))
    model, config = load_model(folder, fast=True, staging=tiny_staging)
    fresh = Qwen3ForCausalLM(config)  # built the ordinary way, parameters initialised
    buffers = dict(fresh.named_buffers())
    assert "model.rotary_emb.cos_sin_cache" in buffers
    for name, buffer in model.named_buffers():
        _assert_bits_equal(buffer, buffers[name], name)


@pytest.mark.parametrize("rank,size", [(1, 2), (3, 4)])
def test_tensor_parallel_shards(hf_checkpoint, tiny_staging, monkeypatch, rank, size):
    hf_model, folder = hf_checkpoint("qwen3", vocab_size=255)  # 255 rows: the last rank is padded
    tensors = _rewrite(folder, torch.bfloat16)
    monkeypatch.setattr(distributed, "tp_rank", lambda: rank)
    monkeypatch.setattr(distributed, "tp_size", lambda: size)
    model, _ = load_model(folder, dtype=torch.bfloat16, fast=True, staging=tiny_staging)
    simple, _ = load_model(folder, dtype=torch.bfloat16, fast=False)
    for (name, a), (_, b) in zip(model.named_parameters(), simple.named_parameters()):
        _assert_bits_equal(a.data, b.data, name)
    attn = model.model.layers[0].self_attn
    q = tensors["model.layers.0.self_attn.q_proj.weight"]  # [Hq*D, H]
    _assert_bits_equal(attn.q_proj.weight.data, q.chunk(size, 0)[rank], "q_proj")
    k = tensors["model.layers.0.self_attn.k_proj.weight"]  # [Hkv*D, H]; 2 kv heads: replicated past tp 2
    _assert_bits_equal(attn.k_proj.weight.data, k.chunk(min(size, 2), 0)[rank * min(size, 2) // size], "k_proj")
    o = tensors["model.layers.0.self_attn.o_proj.weight"]  # [H, Hq*D]
    _assert_bits_equal(attn.o_proj.weight.data, o.chunk(size, 1)[rank], "o_proj")
    embed = model.model.embed_tokens
    table = tensors["model.embed_tokens.weight"]  # [V, H]
    rows = embed.vocab_end - embed.vocab_start
    _assert_bits_equal(embed.weight.data[:rows], table[embed.vocab_start : embed.vocab_end], "embed_tokens")
    assert not embed.weight.data[rows:].any()  # padding rows are zero


class _Bag(nn.Module):
    """Holds one parameter per checkpoint tensor, of its dtype and shape (default weight loader)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=False))


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(7, 301, generator=g) * 3  # [7, 301]: odd sizes, not aligned to anything
    tensors = {
        "f64": floats.double(), "f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (1000,), generator=g), "i32": torch.randint(-2**31, 2**31, (999,),
                                                                                          generator=g).int(),
        "i16": torch.randint(-2**15, 2**15, (33, 3), generator=g).short(),
        "i8": torch.randint(-128, 128, (5001,), generator=g).to(torch.int8),
        "u8": torch.randint(0, 256, (4097,), generator=g).to(torch.uint8),
        "bool": torch.rand(3001, generator=g) > 0.5,
        "f8_e4m3": floats.clamp(-400, 400).to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5), "empty": torch.empty(0, 4),
    }
    return tensors


def test_every_dtype_round_trips(tmp_path, tiny_staging):
    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / WEIGHTS))
    names = {e.name: e.dtype for e in streaming.read_header(tmp_path / WEIGHTS)}
    assert {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"} \
        <= set(names.values()) <= set(streaming.SAFETENSORS_DTYPES)
    bag = _Bag(tensors)
    loaded = streaming.stream_weights(bag, [tmp_path / WEIGHTS], tiny_staging)
    assert loaded == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, t in tensors.items():
        _assert_bits_equal(getattr(bag, name).data, t, name)


def test_unknown_dtypes_go_through_get_tensor(tmp_path, tiny_staging, monkeypatch):
    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / WEIGHTS))
    known = {k: v for k, v in streaming.SAFETENSORS_DTYPES.items() if k not in ("BF16", "F8_E4M3", "BOOL")}
    monkeypatch.setattr(streaming, "SAFETENSORS_DTYPES", known)
    bag = _Bag(tensors)
    streaming.stream_weights(bag, [tmp_path / WEIGHTS], tiny_staging)
    for name, t in tensors.items():
        _assert_bits_equal(getattr(bag, name).data, t, name)


def test_errors_name_the_tensor_and_stop_the_reader(hf_checkpoint, tiny_staging):
    _, folder = hf_checkpoint("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(folder, edit=lambda t: t.update({name: torch.zeros(95, 64)}))
    with pytest.raises(ValueError, match=rf"{name}.*expected \(96, 64\), got \(95, 64\)"):
        load_model(folder, fast=True, staging=tiny_staging)
    assert _no_reader_threads()
    _rewrite(folder, edit=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing 1 weights: {name}"):
        load_model(folder, fast=True, staging=tiny_staging)
    _rewrite(folder, edit=lambda t: t.update({"model.layers.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected weights: model.layers.0.adapter.weight"):
        load_model(folder, fast=True, staging=tiny_staging)


def test_truncated_file_is_rejected(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / WEIGHTS))
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"'w' in model.safetensors: data_offsets .*truncated"):
        streaming.stream_weights(_Bag({"w": torch.ones(1000)}), [tmp_path / WEIGHTS], tiny_staging)


def test_read_errors_reach_the_caller(tmp_path, tiny_staging, monkeypatch):
    tensors = {"a": torch.randn(5000), "b": torch.randn(5000)}
    save_file(tensors, str(tmp_path / WEIGHTS))

    def failing(fd, view, offset):
        raise OSError("disk on fire")

    monkeypatch.setattr(streaming, "_pread_exact", failing)
    with pytest.raises(OSError, match="disk on fire"):
        streaming.stream_weights(_Bag(tensors), [tmp_path / WEIGHTS], tiny_staging)
    assert _no_reader_threads()


def test_plan_packs_small_tensors_and_splits_big_ones(tmp_path):
    save_file({"a": torch.zeros(10), "b": torch.zeros(3000), "c": torch.zeros(5)}, str(tmp_path / WEIGHTS))
    entries = sorted(streaming.read_header(tmp_path / WEIGHTS), key=lambda e: e.offset)  # a, b, c: 40, 12000, 20 B
    chunks = streaming._plan_chunks(entries, 4096)
    assert [c.nbytes for c in chunks] == [4096, 4096, 3868]
    assert [(p.entry.name, p.nbytes, p.last) for p in chunks[0].pieces] == [("a", 40, True), ("b", 4056, False)]
    assert [(p.entry.name, p.nbytes, p.last) for p in chunks[2].pieces] == [("b", 3848, True), ("c", 20, True)]
    assert all(c.offset + c.nbytes == n.offset for c, n in zip(chunks, chunks[1:]))  # one sequential read


def test_info_line_reports_time_and_bandwidth(hf_checkpoint, caplog):
    _, folder = hf_checkpoint("llama")
    with caplog.at_level(logging.INFO, logger="infer.models.loader"):
        load_model(folder)
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert "LlamaForCausalLM" in message and "GB/s" in message and "simple path" in message


@pytest.mark.gpu
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny_staging", "default_staging"])
def test_cuda_load_equals_cpu_load(hf_checkpoint, tiny_staging, tiny):
    _, folder = hf_checkpoint("qwen3", tie_word_embeddings=True, attention_bias=True)
    tensors = _rewrite(folder, torch.bfloat16)
    staging = tiny_staging if tiny else None
    model, _ = load_model(folder, dtype=torch.bfloat16, device="cuda", staging=staging)  # streamed by default on CUDA
    reference, _ = load_model(folder, dtype=torch.bfloat16, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_matches_checkpoint(model, tensors)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.is_cuda, name
        _assert_bits_equal(a, b, name)


@pytest.mark.gpu
def test_cuda_tensor_parallel_shards(hf_checkpoint, tiny_staging, monkeypatch):
    _, folder = hf_checkpoint("qwen3", vocab_size=255)
    _rewrite(folder, torch.bfloat16)
    monkeypatch.setattr(distributed, "tp_rank", lambda: 1)
    monkeypatch.setattr(distributed, "tp_size", lambda: 2)
    model, _ = load_model(folder, dtype=torch.bfloat16, device="cuda", staging=tiny_staging)
    reference, _ = load_model(folder, dtype=torch.bfloat16, device="cpu")
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        _assert_bits_equal(a.data, b.data, name)
