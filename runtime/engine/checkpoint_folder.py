"""What the engine reads of a checkpoint folder besides the weights, checked before they load: the
tokenizer's presence and chat template, and the end-of-sequence ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...models.checkpoint import check_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")


def check_model_folder(model: str | Path) -> None:
    """Everything that can be checked before loading anything: a folder (a Hub id is named as such,
    at once) whose ``config.json`` parses, a tokenizer, and a readable ``generation_config.json``."""
    path = check_folder(model)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise FileNotFoundError(f"no tokenizer in checkpoint folder {str(path)!r}: expected one of "
                                f"{', '.join(TOKENIZER_FILES)}")
    eos_token_ids(None, None, path)  # generation_config.json parses, and its eos ids are ints


def has_chat_template(model: str | Path) -> bool:
    """Whether the checkpoint folder's tokenizer has a chat template (read from its files)."""
    path = Path(model)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _generation_eos(gen_file: Path) -> Any:
    """``eos_token_id`` of a ``generation_config.json`` (None without the file or the key)."""
    if not gen_file.is_file():
        return None
    try:
        generation = json.loads(gen_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{gen_file} is not valid JSON ({e})") from None
    if not isinstance(generation, dict):
        raise ValueError(f"{gen_file} must hold a JSON object, got {type(generation).__name__}")
    return generation.get("eos_token_id")


def eos_token_ids(tokenizer: Any, hf_config: Any, path: Path) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer, the model config and ``generation_config.json``."""
    gen_file = path / "generation_config.json"
    sources = [getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None),
               _generation_eos(gen_file)]
    ids: set[int] = set()
    for source in sources:
        if source is None:
            continue
        values = [source] if not isinstance(source, (list, tuple)) else list(source)
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ValueError(f"eos_token_id must be an int >= 0 or a list of them (in {gen_file.name}, the model "
                             f"config or the tokenizer), got {source!r}")
        ids.update(values)
    return frozenset(ids)
