"""The engine's one configuration object: what to load, how big to batch, how to run the model."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ... import envs
from ..graphs import capture_sizes

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda")
DEFAULT_MAX_MODEL_LEN = 4096  # cap on max_model_len when it is taken from the model config
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20
CPU_UNFUSED = ("fuse_norm", "fuse_activation", "fuse_qk_norm_rope")  # off by default on CPU with Inductor


def _freeze(value: Any) -> Any:
    """Lists become tuples so an option value can live in a frozen, hashable config."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs before it looks at the model; never changed after construction.

    Attributes:
        model: checkpoint folder (``config.json`` + ``*.safetensors`` + tokenizer files).
        dtype: parameter and KV-cache dtype; ``"auto"`` takes the checkpoint's.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        tensor_parallel_size: only 1 is supported for now.
        max_model_len: most tokens (prompt plus output) per sequence; ``None`` until
            :meth:`resolve` fills in ``min(max_position_embeddings, 4096)``.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: most tokens computed in one step (also the profile run's size).
        block_size: tokens per KV-cache block.
        enable_prefix_caching: share the KV blocks of common prompt prefixes.
        enable_chunked_prefill: split long prompts over several steps.
        gpu_memory_utilization: fraction of the GPU's memory the engine may use (CUDA only).
        cpu_kv_cache_bytes: KV-cache size on CPU.
        compile: run the model through ``torch.compile(backend="infer")``.
        compile_options: options for the ``infer`` backend, frozen as sorted ``(name, value)`` pairs.
        enforce_eager: never pad decode batches for (or capture) CUDA graphs.
        cudagraph_capture_sizes: decode token counts to pad to when CUDA graphs are on; empty
            means :func:`infer.runtime.graphs.capture_sizes` up to ``max_num_seqs``.
        async_scheduling: schedule and prepare each decode step while the device still runs the
            one before (see :mod:`.engine_loop`); same outputs as without. It takes effect where
            decode steps replay full CUDA graphs (CUDA, compiled, ``cudagraph_mode="full"``, the
            default), and changes nothing elsewhere.
        staged_compile: compile a model that has stages (``run_stages``, see
            :mod:`infer.models.stages`) stage by stage, one graph serving every decoder layer, where
            no per-piece CUDA graphs are captured (the default full decode graphs, or none);
            ``False`` compiles the whole forward as one graph. Same numbers either way.
        compile_cache_dir: where compiled graphs are saved and reloaded across processes
            (:mod:`infer.compiler.cache`): ``None`` takes ``$INFER_COMPILE_CACHE_DIR`` or
            ``~/.cache/infer/compile``; ``""`` turns the cache off.
        cpu_packed_weights: on CPU, give every linear weight a prepacked copy in oneDNN's layout
            (:mod:`infer.runtime.ops.packed_linear`: about twice the GEMM bandwidth of ``F.linear``,
            for as much memory again as the linear weights take).
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = DEFAULT_CPU_KV_CACHE_BYTES
    compile: bool = True
    compile_options: tuple[tuple[str, Any], ...] = ()
    enforce_eager: bool = False
    cudagraph_capture_sizes: tuple[int, ...] = ()
    async_scheduling: bool = True
    staged_compile: bool = True
    compile_cache_dir: str | None = None
    cpu_packed_weights: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        options = self.compile_options
        if isinstance(options, Mapping):
            options = options.items()
        elif isinstance(options, (str, bytes)) or not all(
                isinstance(item, tuple) and len(item) == 2 for item in options):
            raise ValueError(f"compile_options must be a dict of backend options (e.g. "
                             f"{{'inner_compiler': 'eager'}}), got {self.compile_options!r}")
        object.__setattr__(self, "compile_options", tuple(sorted((str(k), _freeze(v)) for k, v in options)))
        if not self.cudagraph_capture_sizes:
            object.__setattr__(self, "cudagraph_capture_sizes", capture_sizes(self.max_num_seqs))
        object.__setattr__(self, "cudagraph_capture_sizes", tuple(sorted(set(self.cudagraph_capture_sizes))))
        self._validate()

    def _validate(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r}: tensor parallelism (TP > 1) "
                             "is not built into the engine yet; use tensor_parallel_size=1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device.split(":")[0] not in DEVICE_TYPES:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        positive = ["max_num_seqs", "max_num_batched_tokens", "block_size", "cpu_kv_cache_bytes"]
        if self.max_model_len is not None:
            positive.append("max_model_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "compile", "enforce_eager", "async_scheduling",
                     "staged_compile", "cpu_packed_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        sizes = self.cudagraph_capture_sizes
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"cudagraph_capture_sizes must be positive ints, got {sizes!r}")

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def use_cudagraphs(self) -> bool:
        """Whether steps replay CUDA graphs: CUDA, compiled, and not ``enforce_eager``."""
        return self.device_type == "cuda" and self.compile and not self.enforce_eager

    @property
    def resolved_compile_cache_dir(self) -> str | None:
        """The compile cache folder, or None when the cache is off (or nothing is compiled)."""
        if not self.compile or self.compile_cache_dir == "":
            return None
        if self.compile_cache_dir is not None:
            return self.compile_cache_dir
        default = os.path.join(os.path.expanduser("~"), ".cache", "infer", "compile")
        return envs.compile_cache_dir(default)

    @property
    def compile_options_dict(self) -> dict[str, Any]:
        """Backend options; with CUDA graphs on, full decode graphs at the capture sizes by default
        (prefill steps run the compiled graph uncaptured; `cudagraph_mode="piecewise"` selectable).
        On CPU with Inductor, the passes that fuse into custom ops (``CPU_UNFUSED``) default to
        off: Inductor fuses those chains itself. Options given explicitly always win."""
        options = dict(self.compile_options)
        if self.device_type == "cpu" and options.get("inner_compiler", "inductor") == "inductor":
            # On CPU, Inductor fuses norms, SiLU-and-mul and rotary into its own C++ loops; the
            # fused custom ops (GPU kernels, plain torch elsewhere) would only hide them from it.
            # The projections still become infer::linear ops, served from packed weights.
            for name in CPU_UNFUSED:
                options.setdefault(name, False)
        if self.use_cudagraphs:
            options.setdefault("cudagraph_mode", "full")
            options.setdefault("cudagraph_capture_sizes", self.cudagraph_capture_sizes)
        return options

    def resolve(self, hf_config: Any) -> "EngineConfig":
        """A copy with ``max_model_len`` checked against (or taken from) the model's config."""
        limit = getattr(hf_config, "max_position_embeddings", None)
        max_len = self.max_model_len
        if max_len is None:
            max_len = min(limit, DEFAULT_MAX_MODEL_LEN) if limit else DEFAULT_MAX_MODEL_LEN
        elif limit and max_len > limit:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings={limit}")
        return dataclasses.replace(self, max_model_len=max_len)
