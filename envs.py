"""Every environment variable the library reads: one typed getter each, read when called.

Code reads ``envs.compile_cache_dir()``, never ``os.environ``; the README lists the table below
(``python -c "import infer.envs as e; print(e.describe())"`` prints it). A bad value is a
``ValueError`` naming the variable, the value and what is expected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

ENV_VARS: dict[str, str] = {
    "INFER_CACHE_DIR": "where the default model is converted to (default $XDG_CACHE_HOME/infer or ~/.cache/infer)",
    "XDG_CACHE_HOME": "the user's cache root, under which infer/ holds the default model",
    "INFER_COMPILE_CACHE_DIR": "the engine's compile cache (default ~/.cache/infer/compile; empty: off)",
    "INFER_ATTENTION_BACKEND": "force the paged-attention backend: cpu, reference, triton or flash_attn",
    "TRITON_INTERPRET": "1: Triton kernels run on CPU tensors in the interpreter (no PDL, no compile pool)",
    "INFER_PDL": "0: kernels launch without programmatic dependent launch",
    "INFER_PARALLEL_COMPILE": "0: Triton kernels compile one by one at first use, not in the startup pool",
    "INFER_SKINNY_GEMM": "0: decode batches of 3-64 rows use cuBLAS instead of the skinny-GEMM kernel",
    "INFER_FUSE_KV_WRITE": "0: decode steps write K/V in a kernel of their own, not inside decode attention",
    "INFER_DECODE_COMBINE": "0: split decode attention always combines in a separate reduce kernel",
    "INFER_DECODE_STAGES": "a whole number forces the decode-attention pipelining depth (0 or unset: planned)",
    "INFER_DECODE_TABLE_PAGES": "block-table pages held in registers by latency-bound decode launches (0: off; default 64)",
}


def _raw(name: str) -> str | None:
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not one of the library's environment variables ({', '.join(ENV_VARS)})")
    return os.environ.get(name)


def _switch(name: str) -> Callable[[], bool]:
    """On unless set to 0 (an A/B switch)."""
    def read() -> bool:
        value = _raw(name)
        if value in (None, "", "1"):
            return True
        if value == "0":
            return False
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    read.__doc__ = ENV_VARS[name]
    return read


def _count(name: str, default: int, expected: str, valid: Callable[[int], bool] = lambda n: True) -> int:
    value = _raw(name)
    if value in (None, ""):
        return default
    if not value.isdigit() or not valid(int(value)):
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return int(value)


def cache_dir() -> Path:
    """``$INFER_CACHE_DIR``, else ``$XDG_CACHE_HOME/infer``, else ``~/.cache/infer``."""
    if _raw("INFER_CACHE_DIR"):
        return Path(_raw("INFER_CACHE_DIR")).expanduser()
    xdg = _raw("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "infer"


def compile_cache_dir(default: str) -> str | None:
    """``$INFER_COMPILE_CACHE_DIR`` if set (empty: None, the cache off), else ``default``."""
    value = _raw("INFER_COMPILE_CACHE_DIR")
    return (default if value is None else value) or None


def attention_backend() -> str:
    """The forced attention backend, lower-cased; "" when unset."""
    return (_raw("INFER_ATTENTION_BACKEND") or "").strip().lower()


def triton_interpret() -> bool:
    """Whether Triton runs its interpreter (Triton's own reading: 1, true, yes or on)."""
    return (_raw("TRITON_INTERPRET") or "").strip().lower() in ("1", "true", "yes", "on")


pdl = _switch("INFER_PDL")
parallel_compile = _switch("INFER_PARALLEL_COMPILE")
skinny_gemm = _switch("INFER_SKINNY_GEMM")
fuse_kv_write = _switch("INFER_FUSE_KV_WRITE")
decode_combine = _switch("INFER_DECODE_COMBINE")


def decode_stages() -> int | None:
    """A forced decode-attention pipelining depth; None (unset or 0): planned per launch."""
    return _count("INFER_DECODE_STAGES", 0, "a whole number of pipeline stages (0 or unset: planned)") or None


def decode_table_pages() -> int:
    """Block-table entries a latency-bound decode program holds in registers: 0 or a power of two."""
    return _count("INFER_DECODE_TABLE_PAGES", 64, "0 (per-tile table loads) or a power of two",
                  lambda n: n & (n - 1) == 0)


def describe() -> str:
    """The table of variables, as the README lists it."""
    return "\n".join(f"| `{name}` | {text} |" for name, text in ENV_VARS.items())
