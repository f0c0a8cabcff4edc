"""Linear layers from oneDNN-packed weights on the CPU: the same function as ``F.linear``, and never
a stale copy (a weight changed in place, freed or moved runs ``F.linear``)."""
import gc

import pytest
import torch
import torch.nn.functional as F

from infer.runtime.ops import packed_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def weight(n, k, dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(n, k, dtype=dtype), requires_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (2, 3, 96)])
def test_packed_linear_computes_f_linear(dtype, shape):
    w, b = weight(40, 96, dtype), torch.randn(40, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    assert packed_linear.pack_weight(w) and packed_linear.packed_copy(w) is not None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for bias in (None, b):
        out = packed_linear.linear(x, w, bias)
        assert out.shape == (*shape[:-1], 40) and out.dtype == dtype
        torch.testing.assert_close(out, F.linear(x, w, bias), **tol)


def test_a_changed_freed_or_moved_weight_is_never_served_a_stale_copy():
    w = weight(16, 32, torch.float32)
    x = torch.randn(4, 32)
    assert packed_linear.pack_weight(w)
    with torch.no_grad():
        w.mul_(2)  # in place: the version counter moves
    assert packed_linear.packed_copy(w) is None
    torch.testing.assert_close(packed_linear.linear(x, w), F.linear(x, w))
    assert packed_linear.pack_weight(w) and packed_linear.packed_copy(w) is not None
    w.data = torch.randn(16, 32)  # the parameter now lives elsewhere
    assert packed_linear.packed_copy(w) is None
    torch.testing.assert_close(packed_linear.linear(x, w), F.linear(x, w))
    other = weight(8, 8, torch.float32)
    packed_linear.pack_weight(other)
    address = other.data_ptr()
    del other
    gc.collect()
    assert address not in packed_linear._packed  # freed with its weight


def test_inside_packing_weights_are_packed_at_first_use_and_only_there():
    w = weight(24, 48, torch.bfloat16, seed=1)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    packed_linear.linear(x, w)
    assert packed_linear.packed_copy(w) is None  # outside: F.linear, nothing packed
    with packed_linear.packing():
        out = packed_linear.linear(x, w)
    assert packed_linear.packed_copy(w) is not None
    torch.testing.assert_close(out, F.linear(x, w), rtol=1.6e-2, atol=1e-2)
    for t in (torch.randn(4, 4, dtype=torch.float16), torch.randn(4, 4).t(), torch.randn(4, 4, 2)):
        assert not packed_linear.pack_weight(t)  # other dtypes, layouts, ranks: F.linear


def test_the_engine_s_linears_run_from_packed_weights_on_cpu(tmp_path):
    from tiny_hf import make_hf_model, word_tokenizer

    from infer import LLM, SamplingParams
    model = make_hf_model("llama", 0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    word_tokenizer(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 256)]).save_pretrained(tmp_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = {}
    for packed in (False, True):
        llm = LLM(tmp_path, device="cpu", compile=False, cpu_packed_weights=packed, cpu_kv_cache_bytes=1 << 20)
        outs[packed] = [o.token_ids for o in llm.generate([[5, 6, 7, 8], [9, 10]], greedy, use_tqdm=False)]
        weights = [p for n, p in llm.model.named_parameters() if n.endswith("proj.weight")]
        assert all((packed_linear.packed_copy(p) is not None) == packed for p in weights)
    assert outs[True] == outs[False]
