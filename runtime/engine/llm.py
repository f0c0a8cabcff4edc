"""The offline entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence as SequenceABC
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from ...models.loader import load_model
from .block_manager import BlockManager
from .checkpoint_folder import check_model_folder, eos_token_ids
from .config import EngineConfig
from .engine_loop import EngineLoop
from .kv_cache import init_kv_cache
from .model_runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .shared_loop import SharedLoop
from .sequence import FINISH_ERROR, Sequence

logger = logging.getLogger(__name__)

Prompt = Union[str, SequenceABC[int]]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's result.

    Attributes:
        prompt: the prompt text (``None`` for a token-id prompt).
        prompt_token_ids: the ids the model saw (after the chat template, if any).
        text: the decoded completion, special tokens skipped.
        token_ids: generated ids, a final end-of-sequence or stop id included.
        finish_reason: ``"stop"``, ``"length"`` or ``"error"``.
        error: why the request failed, when ``finish_reason == "error"``.
    """

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None


def _vocab_size(model: torch.nn.Module, hf_config: Any) -> int:
    """Rows of the model's input embedding (what a token id indexes); the config's vocab_size
    for a model without one."""
    embedding = next((m for m in model.modules() if hasattr(m, "num_embeddings")), None)
    return int(embedding.num_embeddings) if embedding is not None else int(hf_config.vocab_size)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class UncachedBlockManager(BlockManager):
    """A :class:`BlockManager` that never reuses cached blocks (``enable_prefix_caching=False``)."""

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        return []


def _check_compile_options(config: EngineConfig) -> None:
    """The backend's options, checked before the weights load (unknown names, bad values)."""
    if not config.compile:
        return
    from ...compiler.config import CompilerConfig
    from .. import attention  # noqa: F401  (registers the splitting op the options may name)
    CompilerConfig.from_options(config.compile_options_dict)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy import, deferred to first use
    return AutoTokenizer.from_pretrained(path)


def _prepare_runtime(config: EngineConfig) -> None:
    """A head start for a setup thread while the weights load: the inner compiler's imports
    (Inductor only). Failures only cost the head start: the real use reports them.

    Triton's CUDA driver is not created here: creating it beside the weight load slows the load
    more than it saves later. Re-measure: ``python -m infer.benchmarks startup``."""
    if not config.compile:
        return
    from ...compiler.config import CompilerConfig
    from ...compiler.inner import prepare_inner_compiler
    try:
        prepare_inner_compiler(CompilerConfig.from_options(config.compile_options_dict).inner_compiler)
    except Exception as err:  # a bad option included: the runner reports it
        logger.debug("preparing the inner compiler failed: %r", err)


class LLM:
    """Load a checkpoint once, then generate for batches of prompts with continuous batching.

    Args:
        model: checkpoint folder; ``None`` means the default SmolLM2-135M-Instruct.
        tensor_parallel_size: only 1 for now.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_model_len: most tokens per sequence; default ``min(max_position_embeddings, 4096)``.
        max_num_seqs: most sequences running at once.
        gpu_memory_utilization: fraction of GPU memory to use (CUDA only).
        compile: run the model through ``torch.compile(backend="infer")``.
        device: ``"cuda"`` when available, else ``"cpu"``.
        block_size: tokens per KV block.
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes.
        compile_options: options of the ``infer`` backend, e.g. ``{"inner_compiler": "eager"}``.
        **kwargs: further :class:`EngineConfig` fields (``max_num_batched_tokens``,
            ``cpu_kv_cache_bytes``, ``enable_chunked_prefill``, ``enforce_eager``,
            ``async_scheduling``, ...).
    """

    def __init__(self, model: str | Path | None = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 64, gpu_memory_utilization: float = 0.9,
                 compile: bool = True, device: str | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, compile_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(EngineConfig)})
        if unknown:
            raise TypeError(f"LLM got unknown arguments {unknown}; accepted extra EngineConfig fields: "
                            f"{[f.name for f in dataclasses.fields(EngineConfig)]}")
        if model is None:
            from ...models.default import default_model_path
            model = default_model_path()
        check_model_folder(model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device={device!r} but torch {torch.__version__} ({build}) sees no CUDA device; "
                             "use device='cpu'")
        config = EngineConfig(
            model=str(model), dtype=dtype, device=str(device), tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size, enable_prefix_caching=enable_prefix_caching, compile=compile,
            compile_options=compile_options or {}, **kwargs)
        _check_compile_options(config)
        self._setup(config)

    def _setup(self, config: EngineConfig) -> None:
        import transformers  # noqa: F401  (here, not first on the tokenizer thread: its module swaps
        # itself in sys.modules at the end of its import, and a concurrent importer can get the
        # module from before, without its names)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="llm-setup") as pool:
            tokenizer = pool.submit(_load_tokenizer, config.model)  # overlaps loading and compiling
            pool.submit(_prepare_runtime, config)
            self.model, self.hf_config = load_model(config.model, dtype=config.dtype, device=config.device)
            self.config = config.resolve(self.hf_config)
            self.runner = ModelRunner(self.model, self.config)
            self.num_blocks = init_kv_cache(self.model, self.config, self.runner.profile_run)
            self.capture_seconds = self.runner.capture_cudagraphs()
            self.tokenizer = tokenizer.result()
        self.vocab_size = _vocab_size(self.model, self.hf_config)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.hf_config, Path(config.model))
        manager_cls = BlockManager if self.config.enable_prefix_caching else UncachedBlockManager
        self.block_manager = manager_cls(self.num_blocks, self.config.block_size)
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.config.max_num_seqs, max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_model_len=self.config.max_model_len, enable_chunked_prefill=self.config.enable_chunked_prefill)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.eos_token_ids)
        self.engine_loop = EngineLoop(self.scheduler, self.runner, self.config.async_scheduling)
        self.shared_loop = SharedLoop(self.engine_loop)
        self._request_ids = itertools.count()
        logger.info("LLM ready: %s on %s, max_model_len=%d, %d KV blocks, compile=%s, async scheduling=%s",
                    config.model, config.device, self.config.max_model_len, self.num_blocks, config.compile,
                    self.config.async_scheduling and self.runner.graphs.full)

    @torch.inference_mode()
    def generate(self, prompts: Prompt | SequenceABC[Prompt],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = True, chat: bool = False) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order.

        ``prompts``: a string, a list of strings, or a list of token-id lists. ``sampling_params``:
        one for all prompts or one per prompt. ``chat``: wrap each string prompt in the tokenizer's
        chat template (as a user message, with the generation prompt). A request that cannot run
        (empty, too long, bad token ids) gets ``finish_reason="error"``; the others complete.
        """
        items = self._prompt_list(prompts)
        params = self._params_list(sampling_params, len(items))
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat=True but the tokenizer of {self.config.model} has no chat template")
        encoded = [self._encode(prompt, chat) for prompt in items]  # raises before anything is queued
        outputs: list[RequestOutput | None] = [None] * len(items)
        where: dict[int, tuple[int, str | None]] = {}  # request id -> prompt index and text
        seqs = []
        for index, ((text, ids, error), sp) in enumerate(zip(encoded, params)):
            if error is not None:
                outputs[index] = RequestOutput(text, ids, "", [], FINISH_ERROR, error)
                logger.warning("request %d failed: %s", index, error)
                continue
            seq = Sequence(next(self._request_ids), ids, sp)
            where[seq.request_id] = (index, text)
            seqs.append(seq)
        with tqdm(total=len(items), disable=not use_tqdm, desc="generate", unit="req") as bar:
            bar.update(len(items) - len(seqs))
            for seq in self.shared_loop.run(seqs):  # concurrent calls share one batch
                index, text = where[seq.request_id]
                outputs[index] = self._output(text, seq)
                bar.update(1)
        return outputs  # type: ignore[return-value]

    def _prompt_list(self, prompts: Any) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, "
                            f"got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        for p in prompts:
            if not isinstance(p, (str, list, tuple)):
                raise TypeError(f"each prompt must be a str or a list of token ids, got {type(p).__name__}: {p!r}")
        return list(prompts)

    @staticmethod
    def _params_list(sampling_params: Any, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
        bad = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
        if bad:
            raise TypeError(f"sampling_params must be SamplingParams, got {bad}")
        return params

    def _encode(self, prompt: Prompt, chat: bool) -> tuple[str | None, list[int], str | None]:
        """``(text, token_ids, error)`` of one prompt; ``error`` is None when it can run. Every
        prompt's ids are checked against the model's vocabulary, however it was given."""
        if not isinstance(prompt, str):
            if chat:
                raise ValueError("chat=True needs string prompts, got a token-id list")
            ids = list(prompt)
            if not ids:
                return None, [], "prompt is empty (0 token ids)"
            bad = self._bad_ids(ids)
            return None, ids, f"prompt token ids must be ints in [0, {self.vocab_size}), got {bad!r}" if bad else None
        if not prompt:
            return prompt, [], "prompt is empty (an empty string)"
        if chat:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            return prompt, [], f"prompt {prompt!r} encodes to 0 tokens"
        bad = self._bad_ids(ids)
        error = (f"prompt {_short(prompt)} encodes to token ids that are not in the model's vocabulary "
                 f"[0, {self.vocab_size}): {bad!r} (the tokenizer is larger than the embedding)") if bad else None
        return prompt, ids, error

    def _bad_ids(self, ids: list) -> list:
        """The ids that are not ints in the model's vocabulary (at most eight)."""
        vocab = self.vocab_size
        if set(map(type, ids)) <= {int} and 0 <= min(ids) and max(ids) < vocab:
            return []  # in C: a 1K-token prompt is checked in ~60 us, not ~250
        return [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab][:8]

    def _output(self, prompt: str | None, seq: Sequence) -> RequestOutput:
        ids = seq.output_token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        return RequestOutput(prompt, seq.prompt_token_ids, text, ids, seq.finish_reason, seq.error)
