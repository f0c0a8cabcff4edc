"""The Gumbel-max sampling kernel (under the interpreter on CPU).

The chain of guarantees: the plain-torch reference hash is lowbias32 (against plain Python ints) and
its words look independent across seeds, rows and neighbouring indices; the kernel's tokens are exactly the reference's ``argmax(x - T log E)`` on the same noise, whatever the
dtype, tiling, split or row stride; that noise draws ``softmax(x / T)`` (chi-square over many rows,
run on the reference since the interpreter is slow); and the sampler takes the kernel with seeds
that follow ``torch.manual_seed``.
"""
import pytest
import torch

from infer.runtime.engine import sampler
from infer.runtime.engine.sampling import SamplingParams
from infer.runtime.kernels.sampling_triton import (
    SEED_BIT, SamplingConfig, choose_config, draw_seed, gumbel_sample, kernel_exponential, reference_exponential,
    reference_bits, reference_mix, reference_sample)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [SEED_BIT | 0x1234_5678_9ABC, SEED_BIT | 7]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def logits_like(rows: int, vocab: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 2).to(dtype).to(DEVICE)


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the token counts under ``probs`` (Pearson's chi-square)."""
    counts = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    expected = counts.sum() * probs.double()
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2, dtype=torch.float64), stat / 2).item()


def python_mix(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ x >> 16


def test_reference_mix_is_lowbias32():
    xs = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 0x12345678, 0xDEADBEEF]
    assert reference_mix(torch.tensor(xs)).tolist() == [python_mix(x) for x in xs]
    assert len(set(reference_mix(torch.arange(1 << 16)).tolist())) == 1 << 16  # a bijection


def uniforms(seed: int, rows: int, vocab: int) -> torch.Tensor:
    return (reference_bits(seed, rows, vocab).double() + 0.5) / 2 ** 32


def test_words_of_rows_indices_and_seeds_look_independent():
    """Uniform marginals; no correlation between neighbouring indices, neighbouring rows or two
    seeds (|r| < 4 / sqrt(n), n = 64K pairs); each byte of the word flat."""
    u = uniforms(SEEDS[0], 64, 1024)  # [64, 1024]
    bound = 4 / (64 * 1024) ** 0.5
    assert abs(u.mean().item() - 0.5) < bound and abs(u.var().item() - 1 / 12) < bound
    pairs = [(u[:, :-1], u[:, 1:]), (u[:, :-2], u[:, 2:]), (u[:-1], u[1:]),
             (u, uniforms(SEEDS[1], 64, 1024)), (u, uniforms(SEEDS[0] ^ 1, 64, 1024))]
    for a, b in pairs:
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < bound
    bits = reference_bits(SEEDS[0], 64, 1024)
    for low in (0, 8, 16, 24):
        assert chi_square_p(((bits >> low) & 0xFF).flatten(), torch.full((256,), 1 / 256)) > 1e-3


def test_two_seeds_and_neighbouring_rows_draw_independent_tokens():
    """Flat logits: the tokens of two seeds (and of neighbouring rows) agree with probability 1/V."""
    rows, vocab = 20000, 16
    x = torch.zeros(rows, vocab)
    first, second = reference_sample(x, 1.0, SEEDS[0]), reference_sample(x, 1.0, SEEDS[1])
    bound = 4 * (1 / vocab / rows) ** 0.5
    assert abs((first == second).double().mean().item() - 1 / vocab) < bound
    assert abs((first[1:] == first[:-1]).double().mean().item() - 1 / vocab) < bound
    assert chi_square_p(first, torch.full((vocab,), 1 / vocab)) > 1e-3
    y = logits_like(4, 64)
    assert gumbel_sample(y, 1.0, SEEDS[0]).tolist() == reference_sample(y, 1.0, SEEDS[0]).tolist()


def test_noise_is_exponential_of_the_words_with_full_relative_precision():
    """Kernel noise = reference noise; reference = ``-log1p(-w)`` in float64 to ~fp32 precision for
    ``E < 1``, down to the smallest draws (the tokens that win against the odds). Large ``E`` (sure
    losers) come from ``w`` near 1 and keep only fp32's absolute precision."""
    rows, vocab = 20, 300
    ref = reference_exponential(SEEDS[0], rows, vocab)
    tol = dict(rtol=2e-6, atol=0) if DEVICE == "cpu" else dict(rtol=3e-5, atol=0)  # GPU: approximate log2
    torch.testing.assert_close(kernel_exponential(SEEDS[0], rows, vocab, DEVICE).cpu(), ref, **tol)
    exact = -torch.log1p(-(reference_bits(SEEDS[0], rows, vocab).double() + 0.5) / 2 ** 32)
    assert (exact < 2 ** -4).sum() > 200  # the series branch is exercised
    small = exact < 1
    torch.testing.assert_close(ref.double()[small], exact[small], rtol=4e-6, atol=0)
    torch.testing.assert_close(ref.double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_kernel_tokens_are_the_reference_argmax_on_the_same_noise(dtype):
    x = logits_like(6, 200, dtype)
    for seed in SEEDS:
        for temperature in (0.6, 1.7):
            got = gumbel_sample(x, temperature, seed)
            assert got.dtype == torch.int64 and got.device == x.device
            assert got.tolist() == reference_sample(x, temperature, seed).tolist()
    assert gumbel_sample(x, 1.0, SEEDS[0]).tolist() != gumbel_sample(x, 1.0, SEEDS[1]).tolist()


@pytest.mark.parametrize("config", [SamplingConfig(8, 1, 1), SamplingConfig(16, 3, 1), SamplingConfig(32, 2, 2),
                                    SamplingConfig(128, 1, 4), SamplingConfig(16, 50, 1)], ids=str)
def test_tiling_and_split_do_not_change_the_noise(config):
    x = logits_like(3, 101)
    assert gumbel_sample(x, 0.8, SEEDS[0], config).tolist() == reference_sample(x, 0.8, SEEDS[0]).tolist()


def test_strided_and_transposed_rows():
    wide = logits_like(4, 150)
    x = wide[:, 10:110]  # row stride 150
    assert gumbel_sample(x, 0.9, SEEDS[0]).tolist() == reference_sample(x, 0.9, SEEDS[0]).tolist()
    xt = logits_like(60, 5).t()  # [5, 60], column stride 5: copied first
    assert gumbel_sample(xt, 0.9, SEEDS[1]).tolist() == reference_sample(xt, 0.9, SEEDS[1]).tolist()


@pytest.mark.parametrize("config", [None, SamplingConfig(16, 3, 1)], ids=["default", "split"])
def test_ties_go_to_the_lowest_index_and_masked_tokens_never_win(config):
    x = logits_like(5, 80)
    x[0, [40, 7]] = float("inf")  # other tiles (and splits): the lower wins
    x[1, [6, 5]] = float("inf")  # one tile, neighbouring lanes
    x[2] = float("-inf")  # nothing to draw: index 0, as torch.argmax answers
    x[3, :] = float("-inf")
    x[3, [50, 75]] = 0.0  # a masked vocabulary
    for seed in SEEDS:
        got = gumbel_sample(x, 1.0, seed, config).tolist()
        assert got[:3] == [7, 5, 0] and got[3] in (50, 75)


def test_temperature_scales_the_logits():
    x = logits_like(8, 64)
    for seed in SEEDS:  # exact: scaling x and T by 4 scales every score by 4
        assert gumbel_sample(x * 4, 2.4, seed).tolist() == gumbel_sample(x, 0.6, seed).tolist()
    spaced = torch.randperm(64, generator=torch.Generator().manual_seed(1)).float().mul(0.1).expand(4, 64)
    spaced = spaced.to(DEVICE)  # gaps of 0.1 > T * max noise (2e-3 at T = 1e-4): the argmax
    assert gumbel_sample(spaced, 1e-4, SEEDS[0]).tolist() == spaced.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_reference_noise_draws_softmax(temperature):
    """40000 rows of one distribution, a rare token (p ~ 1e-3 at T = 1) included."""
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -5.0])
    tokens = reference_sample(x.expand(40000, 6), temperature, SEEDS[0])
    assert chi_square_p(tokens, torch.softmax(x.double() / temperature, 0)) > 1e-3
    noise = reference_exponential(SEEDS[1], 100, 1000)
    assert abs(noise.mean().item() - 1) < 0.01 and abs(noise.var().item() - 1) < 0.03 and noise.min() > 0


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(5)
    first, second = draw_seed(), draw_seed()
    torch.manual_seed(5)
    assert [draw_seed(), draw_seed()] == [first, second] and first != second
    assert first & SEED_BIT and 0 < first < 2 ** 63
    assert draw_seed(torch.Generator().manual_seed(1)) == draw_seed(torch.Generator().manual_seed(1))


def test_sampler_takes_the_kernel_for_temperature_only_rows(monkeypatch):
    monkeypatch.setattr(sampler, "KERNEL_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(sampler, "KERNEL_MIN_ROWS", 1)
    x = logits_like(4, 60, torch.bfloat16)
    params = [SamplingParams(temperature=0.7)] * 4
    torch.manual_seed(3)
    first, second = sampler.sample(x, params), sampler.sample(x, params)
    torch.manual_seed(3)
    assert sampler.sample(x, params).tolist() == first.tolist()  # reproducible
    torch.manual_seed(3)
    assert first.tolist() == reference_sample(x, 0.7, draw_seed()).tolist()  # one seed per call
    assert second.tolist() == reference_sample(x, 0.7, draw_seed()).tolist()


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, top_p=0.9)])
def test_sampler_keeps_the_torch_race_for_filters(monkeypatch, sp):
    monkeypatch.setattr(sampler, "KERNEL_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(sampler, "KERNEL_MIN_ROWS", 1)
    x = logits_like(4, 60)
    torch.manual_seed(3)
    got = sampler.sample(x, [sp] * 4)
    torch.manual_seed(3)
    assert got.tolist() == sampler._race_shared(x, sp).tolist()


def test_gumbel_sample_rejects_bad_input():
    x = logits_like(2, 16)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gumbel_sample(x, 0.0, SEEDS[0])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        gumbel_sample(x[0], 1.0, SEEDS[0])
    with pytest.raises(ValueError, match="power-of-2 block"):
        gumbel_sample(x, 1.0, SEEDS[0], SamplingConfig(12, 1, 1))
    assert gumbel_sample(x[:0], 1.0, SEEDS[0]).shape == (0,)


# ---------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_kernel_matches_reference_at_full_vocab(rows, dtype):
    """The default (split) configs on a real vocab; exact, unless an approximate log on the GPU
    turns a near-tie (score gap ~1e-6) the other way."""
    x = (torch.randn(rows, 151936, device="cuda") * 3).to(dtype)
    cfg = choose_config(rows, 151936, x.device)
    assert rows >= 48 or cfg.splits > 1
    for seed in SEEDS:
        assert gumbel_sample(x, 0.6, seed).tolist() == reference_sample(x, 0.6, seed).tolist()
    assert gumbel_sample(x, 0.6, SEEDS[0], SamplingConfig(2048, 1, 4)).tolist() == \
        gumbel_sample(x, 0.6, SEEDS[0], SamplingConfig(1024, 7, 8)).tolist()


@pytest.mark.gpu
def test_cuda_kernel_draws_softmax():
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -5.0, -8.0, 3.0], device="cuda")
    for temperature in (0.6, 1.3):
        tokens = gumbel_sample(x.expand(400000, 8), temperature, draw_seed())
        assert chi_square_p(tokens, torch.softmax(x.double().cpu() / temperature, 0)) > 1e-3


@pytest.mark.gpu
def test_cuda_sampler_takes_the_kernel():
    x = torch.randn(256, 151936, device="cuda", dtype=torch.bfloat16) * 3
    params = [SamplingParams(temperature=0.6)] * 256
    torch.manual_seed(0)
    got = sampler.sample(x, params)
    torch.manual_seed(0)
    assert got.tolist() == gumbel_sample(x, 0.6, draw_seed()).tolist()


@pytest.mark.gpu
def test_cuda_batch_sizes_share_one_compiled_variant():
    """Batches of 64 to 256 rows (3-9 splits) run the kernels compiled for the first one: a new
    variant per batch size compiled mid-generation (~0.1 s each in the throughput run)."""
    from infer.runtime.kernels.sampling_triton import _argmax_splits_kernel, _gumbel_argmax_kernel

    def variants():
        device = torch.cuda.current_device()
        return [len(k.device_caches[device][0]) for k in (_gumbel_argmax_kernel, _argmax_splits_kernel)]

    x = torch.randn(256, 151936, device="cuda", dtype=torch.bfloat16) * 3
    gumbel_sample(x[:64], 0.6, SEEDS[0])
    before = variants()
    for rows in (65, 100, 128, 200, 256):
        assert choose_config(rows, 151936, x.device).splits > 1
        assert gumbel_sample(x[:rows], 0.6, SEEDS[0]).tolist() == reference_sample(x[:rows], 0.6, SEEDS[0]).tolist()
    assert variants() == before
