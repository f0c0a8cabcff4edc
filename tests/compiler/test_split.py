"""Graph splitting around paged attention, split-vs-unsplit numerics, and CUDA-graph replay."""
import copy

import pytest
import torch
import transformers

import infer.compiler as ic
from infer.models.loader import load_model
from infer.runtime.attention import Attention, AttentionMetadata, forward_context

BLOCK = 4
NUM_BLOCKS = 128  # 16 sequences x 8 blocks: no two sequences share a block


def _model(tmp_path, device="cpu", dtype=torch.float32, layers=2):
    head_dim = 64 if device == "cuda" else 16  # the Triton kernels take head_dim 64, 128, 256
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=dtype, device=device)
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.zeros(2, NUM_BLOCKS, BLOCK, m.num_kv_heads, m.head_dim, dtype=dtype, device=device))
    return model


def _caches(model):
    return [m.kv_cache for m in model.modules() if isinstance(m, Attention)]


def _steps(device):
    """A prefill of two ragged prompts, then a decode step of both: (ids, positions, metadata)."""
    tables = [[3, 9, 1, 7], [5, 2, 8, 0]]
    prefill = AttentionMetadata.build([7, 5], [7, 5], tables, BLOCK, device)
    decode = AttentionMetadata.build([1, 1], [8, 6], tables, BLOCK, device)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.tensor(list(range(7)) + list(range(5)), device=device)
    return [(ids, pos, prefill), (ids[:2] + 1, torch.tensor([7, 5], device=device), decode)]


def _run(model, forward, device):
    outs = []
    for ids, pos, md in _steps(device):
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(pos, 0)
        with forward_context(md), torch.inference_mode():
            outs.append(forward(ids, pos).clone())
    return outs


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_pieces_are_attention_calls_plus_one_and_match_eager(tmp_path, inner):
    model = _model(tmp_path)
    reference = copy.deepcopy(model)
    expected = _run(reference, reference.forward, "cpu")
    compiled = torch.compile(model.forward, backend="infer", options={"inner_compiler": inner})
    actual = _run(model, compiled, "cpu")
    report = ic.last_report()
    assert report.split_ops == {"infer::paged_attention": 2}
    assert report.pieces == 2 + 1
    assert report.passes["defunctionalize"] == 2  # the cache is written in place, never copied
    assert report.split_ops_run_on == "cpu"
    assert report.fusions["pack(q,k,v)"] == 2 and report.fusions["fused_add_rms_norm"] == 2 * 2 + 1  # + the final norm
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip(_caches(model), _caches(reference)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_unsplit_graph_matches_split(tmp_path):
    model = _model(tmp_path)
    split = _run(model, torch.compile(model.forward, backend="infer", options={"inner_compiler": "eager"}), "cpu")
    torch._dynamo.reset()
    for c in _caches(model):
        c.zero_()
    whole = _run(model, torch.compile(model.forward, backend="infer",
                                      options={"inner_compiler": "eager", "splitting_ops": ()}), "cpu")
    assert ic.last_report().pieces == 1 and ic.last_report().split_ops == {}
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _decode_metadata(batch, device, lens):
    # Blocks of their own, as the engine's block manager hands them out: a block that another
    # sequence reads while this step writes into it would race in the fused write + decode kernel.
    tables = [[b * 8 + j for j in range(8)] for b in range(batch)]
    return AttentionMetadata.build([1] * batch, lens, tables, BLOCK, device, max_blocks_per_seq=8)


@pytest.mark.gpu
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_piecewise_replay_matches_eager_for_every_size(tmp_path, inner):
    model = _model(tmp_path, "cuda", torch.bfloat16)
    reference = copy.deepcopy(model)
    sizes = (1, 2, 4, 8)
    options = {"inner_compiler": inner, "cudagraph_mode": "piecewise", "cudagraph_capture_sizes": sizes,
               "debug_cudagraph_addresses": True}
    compiled = torch.compile(model.forward, backend="infer", options=options)
    gen = torch.Generator().manual_seed(0)
    # Size 1 is its own (static) Dynamo graph; 2..16 share one dynamic graph whose pieces capture
    # 2, 4 and 8; 3 pads to nothing here (not captured) and 16 is above the largest size.
    for batch in (1, 8, 4, 2, 3, 16, 8, 3):
        for _ in range(3):  # warm-up, capture, replay
            lens = torch.randint(5, 30, (batch,), generator=gen).tolist()
            md = _decode_metadata(batch, "cuda", lens)
            ids = torch.randint(0, 128, (batch,), generator=gen).cuda()
            pos = torch.tensor([n - 1 for n in lens], device="cuda")
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(pos, 0)
            with forward_context(md), torch.inference_mode():
                out = compiled(ids, pos).clone()
                exp = reference(ids, pos)
            torch.testing.assert_close(out.float(), exp.float(), atol=3e-2, rtol=3e-2)
    stats = ic.last_report().cudagraphs
    assert stats.captured_graphs == 3 * 3 and stats.sizes == (2, 4, 8) and stats.pool_bytes >= 0


@pytest.mark.gpu
def test_full_graph_decode_equals_piecewise(tmp_path):
    model = _model(tmp_path, "cuda", torch.bfloat16)
    piecewise_model = copy.deepcopy(model)
    batch = 4
    static_md = _decode_metadata(batch, "cuda", [9] * batch)
    ids, pos = torch.zeros(batch, dtype=torch.long, device="cuda"), torch.zeros(batch, dtype=torch.long, device="cuda")
    full = torch.compile(model.forward, backend="infer",
                         options={"inner_compiler": "eager", "cudagraph_mode": "full", "cudagraph_capture_sizes": (4,)})
    piecewise = torch.compile(piecewise_model.forward, backend="infer",
                              options={"inner_compiler": "eager", "cudagraph_mode": "piecewise",
                                       "cudagraph_capture_sizes": (4,)})
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        lens = torch.randint(5, 30, (batch,), generator=gen).tolist()
        fresh = _decode_metadata(batch, "cuda", lens)
        for name in ("slot_mapping", "seq_lens", "block_tables", "query_start_loc"):  # one metadata update
            getattr(static_md, name).copy_(getattr(fresh, name))
        ids.copy_(torch.randint(0, 128, (batch,), generator=gen))
        pos.copy_(torch.tensor([n - 1 for n in lens]))
        with torch.inference_mode():
            with forward_context(static_md):
                a = model.compute_logits(full(ids, pos)).argmax(-1)
            with forward_context(fresh):
                b = piecewise_model.compute_logits(piecewise(ids, pos)).argmax(-1)
        assert torch.equal(a, b), (step, a, b)
    assert ic.last_report().cudagraphs.captured_graphs >= 1
