"""Every Triton launch of the project goes through :func:`launch`, so that launches can be made dry
in one place, without patching Triton: inside :func:`dry_launches` a launch binds its arguments
(Triton's warm-up call: a kernel not compiled yet reaches the ``jit_cache_hook``) and stops before
the launch itself. :mod:`.precompile` uses it to name kernels for its compile pool."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

_lock = threading.Lock()
_dry_depth = 0  # process-wide, like Triton's hook: while deferring, launches from any thread are dry


def launch(kernel, grid) -> Callable:
    """``kernel[grid]``, or its dry stand-in inside :func:`dry_launches`; call it with the
    kernel's arguments."""
    if _dry_depth:
        return lambda *args, **kwargs: kernel.run(*args, grid=grid, warmup=True, **kwargs)
    return kernel[grid]


@contextlib.contextmanager
def dry_launches() -> Iterator[None]:
    """Inside, every :func:`launch` binds its arguments and launches nothing (nests)."""
    global _dry_depth
    with _lock:
        _dry_depth += 1
    try:
        yield
    finally:
        with _lock:
            _dry_depth -= 1


def launches_are_dry() -> bool:
    return _dry_depth > 0
