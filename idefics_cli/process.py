"""Process-wide settings: changed by the commands, left alone for a program that uses the library.

`tune_process()` opts this process in (the commands call it; a program may): TOKENIZERS_PARALLELISM=false unless set,
library warnings ignored, bitsandbytes and kernels loggers at errors (unless IDEFICS_DEBUG=1). `quiet_hub()`,
`quiet_loaded()` and `tune_allocators()` (`tune()`) do their part as libraries load, only opted in. Idempotent.
`env_seconds(name, default)`: a time bound that an environment variable may set (tests make them short).
"""

from __future__ import annotations

import os
import warnings

ENV = "IDEFICS_ALLOCATOR"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD, PILLOW_BLOCKS = 256 * 2**20, 2**30, 8

_tuned = False
_done: list[str] | None = None


def debug() -> bool:
    return bool(os.environ.get("IDEFICS_DEBUG"))


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable `name` when it holds a positive number, else `default`."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if 0 < value < float("inf") else default


def tune_process() -> None:
    """Opt this process in to the commands' settings (once)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if not debug():
        import logging

        for name in ("bitsandbytes", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet_hub() -> None:
    """Opted in: no retry chatter from huggingface_hub (its logger is reset when it is first imported)."""
    if _tuned and not debug():
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()


def quiet_loaded() -> None:
    """Opted in: transformers logs errors only and draws no progress bars (set once it is imported)."""
    if not _tuned:
        return
    quiet_hub()
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def tune_allocators() -> list[str]:
    """Opted in: tune() (what it changed); else nothing."""
    return tune() if _tuned else []


def tune() -> list[str]:
    """Once: glibc's malloc keeps blocks under 256 MiB on its heap and 1 GiB freed at its top, Pillow 8 freed blocks, so
    big buffers are reused; `MALLOC_*`/`GLIBC_TUNABLES`, `PILLOW_BLOCKS_MAX` or `IDEFICS_ALLOCATOR=default` win. The
    names of what was changed."""
    global _done
    if _done is not None:
        return _done
    changed: list[str] = []
    if os.environ.get(ENV, "").strip().lower() != "default":
        malloc_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
        if not malloc_set and _mallopt((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            changed.append("malloc")
        if "PILLOW_BLOCKS_MAX" not in os.environ and _pillow():
            changed.append("pillow")
    _done = changed
    return changed


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt(param, value) for each of `settings` in turn; False off glibc or when one is refused."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) for param, value in settings)


def one_malloc_arena() -> bool:
    """One glibc malloc arena for all threads, so `transcribe`'s buffers freed in another thread than they were made
    in do not pile up; True when set, False off glibc."""
    return _mallopt((M_ARENA_MAX, 1))


def _pillow() -> bool:
    from PIL import Image

    if Image.core.get_blocks_max() >= PILLOW_BLOCKS:
        return False
    Image.core.set_blocks_max(PILLOW_BLOCKS)
    return True
