"""``KernelCompiles.deferring``: inside it a not-yet-compiled Triton kernel is compiled on a pool
instead of launched; after ``wait``, the real launch finds the kernel compiled, with its exact
specialization."""
import pytest
import torch

from infer.runtime.kernels.precompile import parallel_compiles


def test_nothing_is_deferred_off_cuda(monkeypatch):
    assert parallel_compiles(torch.device("cpu")) is None
    monkeypatch.setenv("INFER_PARALLEL_COMPILE", "0")
    assert parallel_compiles(torch.device("cuda")) is None


def _scale_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(x_ptr, y_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * FACTOR, mask=mask)

    return _scale


@pytest.mark.gpu
def test_dry_launches_compile_on_the_pool_and_the_real_launch_reuses_them():
    kernel = _scale_kernel()  # a fresh JITFunction: its in-memory cache starts empty
    device = torch.device("cuda")
    x = torch.arange(100, dtype=torch.float32, device=device)  # [100]
    y = torch.zeros_like(x)
    kernel_cache = lambda: kernel.device_caches[torch.cuda.current_device()][0]  # noqa: E731
    compiles = parallel_compiles(device)
    assert compiles is not None
    try:
        with compiles.deferring():
            for factor in (3, 3, 5):  # the repeat is handed off once
                kernel[(1,)](x, y, x.numel(), FACTOR=factor, BLOCK=128)
            torch.cuda.synchronize()
            dry = y.clone()
        compiles.wait()
    finally:
        compiles.close()
    assert compiles.submitted == 2 and not compiles.failed
    assert torch.equal(dry, torch.zeros_like(x)), "a deferred launch must not run"
    assert len(kernel_cache()) == 2
    for factor in (3, 5):
        kernel[(1,)](x, y, x.numel(), FACTOR=factor, BLOCK=128)
        torch.testing.assert_close(y, x * factor, atol=0, rtol=0)
    assert len(kernel_cache()) == 2, "the real launches must hit the pool's compiles"


def test_deferring_turns_every_launch_into_a_warmup_and_restores_launches_after():
    import triton

    from infer.runtime.kernels.launch import launch, launches_are_dry
    from infer.runtime.kernels.precompile import KernelCompiles

    class Kernel:  # the two entry points of a Triton kernel: launch (kernel[grid]) and run
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append(("launch", args, grid, kwargs))

        def run(self, *args, grid, warmup, **kwargs):
            self.calls.append(("run", args, grid, warmup, kwargs))

    kernel = Kernel()
    getitem = triton.runtime.jit.JITFunction.__dict__.get("__getitem__")
    compiles = KernelCompiles(workers=1)
    try:
        with compiles.deferring():
            assert launches_are_dry()
            launch(kernel, (3,))(7, flag=True)
            assert triton.runtime.jit.JITFunction.__dict__.get("__getitem__") is getitem  # Triton untouched
        launch(kernel, (2,))(8)
    finally:
        compiles.close()
    assert not launches_are_dry()
    assert kernel.calls == [("run", (7,), (3,), True, {"flag": True}), ("launch", (8,), (2,), {})]


def test_every_triton_launch_of_the_project_goes_through_launch():
    """A ``kernel[grid](...)`` written directly would launch during dry steps."""
    import re
    from pathlib import Path
    kernels = Path(__file__).resolve().parents[3] / "runtime" / "kernels"
    direct = [f"{p.name}:{i}" for p in sorted(kernels.glob("*.py"))
              for i, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"_kernel\[[^\]]*\]\(", line) and not line.lstrip().startswith("#")]
    assert direct == []


@pytest.mark.gpu
def test_a_dry_launch_of_a_compiled_kernel_does_not_run():
    kernel = _scale_kernel()
    x = torch.arange(100, dtype=torch.float32, device="cuda")  # [100]
    y = torch.zeros_like(x)
    kernel[(1,)](x, y, x.numel(), FACTOR=2, BLOCK=128)  # compiled and launched for real
    torch.testing.assert_close(y, x * 2, atol=0, rtol=0)
    y.zero_()
    compiles = parallel_compiles(torch.device("cuda"))
    try:
        with compiles.deferring():
            kernel[(1,)](x, y, x.numel(), FACTOR=2, BLOCK=128)  # compiled: skipped all the same
            torch.cuda.synchronize()
            assert compiles.submitted == 0
            assert torch.equal(y, torch.zeros_like(x)), "a dry launch must not run a compiled kernel"
        compiles.wait()
    finally:
        compiles.close()


def test_dry_steps_run_the_first_layer_of_each_kind_only():
    from infer.runtime.engine.forward import first_of_each_kind
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8), torch.nn.Linear(4, 4)]
    ran = []

    def layer_fn(module, hidden, residual, shared):
        ran.append(module)
        return hidden + 1, residual + shared

    dry = first_of_each_kind(layer_fn)
    hidden, residual = torch.zeros(2), torch.zeros(2)
    for module in layers:
        hidden, residual = dry(module, hidden, residual, torch.ones(2))
    assert ran == [layers[0], layers[2]]  # one per (class, parameter shapes)
    torch.testing.assert_close(hidden, torch.full((2,), 2.0))
    torch.testing.assert_close(residual, torch.full((2,), 2.0))



def _tiny_llama(device: str = "cpu"):
    """A 4-layer random Llama (head_dim 64, which the Triton kernels take) with a bound KV cache,
    and a 2-sequence prefill step's metadata."""
    from infer.models.llama import LlamaForCausalLM
    from infer.runtime.attention import Attention, AttentionMetadata
    from tiny_hf import make_hf_model

    config = make_hf_model("llama", num_hidden_layers=4, hidden_size=256, head_dim=64).config
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    for module in model.modules():
        if isinstance(module, Attention):
            module.bind_kv_cache(torch.zeros(2, 8, 4, module.num_kv_heads, module.head_dim, device=device))
    metadata = AttentionMetadata.build([7, 5], [7, 5], [[0, 1], [2, 3]], 4, device)
    ids = torch.arange(3, 15, device=device)  # [12]
    positions = torch.tensor(list(range(7)) + list(range(5)), device=device)  # [12]
    return model, metadata, ids, positions


def test_profile_forward_runs_the_first_layer_of_each_kind(monkeypatch):
    from infer.models.llama import LlamaDecoderLayer
    from infer.runtime.attention import forward_context
    from infer.runtime.engine.startup import profile_forward

    model, metadata, ids, positions = _tiny_llama()
    ran = []
    layer_forward = LlamaDecoderLayer.forward

    def counted(layer, *args):
        ran.append(layer)
        return layer_forward(layer, *args)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    with torch.inference_mode(), forward_context(metadata):
        hidden = profile_forward(model, ids, positions)  # [T, H]
    assert ran == [model.model.layers[0]]  # the other three are of the same kind
    assert hidden.shape == (12, model.config.hidden_size)
    ran.clear()
    with torch.inference_mode(), forward_context(metadata):
        model(ids, positions)
    assert ran == list(model.model.layers)  # the model's own forward is untouched


@pytest.mark.gpu
def test_profile_forward_has_the_whole_stack_s_activation_peak():
    from infer.runtime.attention import forward_context
    from infer.runtime.engine.startup import profile_forward

    model, metadata, ids, positions = _tiny_llama("cuda")
    with torch.inference_mode(), forward_context(metadata):
        model(ids, positions)  # first calls allocate for good (cuBLAS's workspace): not activations
    peaks = []
    for forward in (model, lambda i, p: profile_forward(model, i, p)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode(), forward_context(metadata):
            out = forward(ids, positions)  # [T, H]
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del out
    assert peaks[0] > 0 and peaks[1] == peaks[0]
