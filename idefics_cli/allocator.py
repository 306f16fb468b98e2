"""The process's memory allocators, tuned for the CPU engine's large short-lived buffers.

`tune()` (once; at a model's load in processes that opted in, through process.py) makes glibc's malloc keep blocks
under 256 MiB on its heap and 1 GiB freed at its top, and Pillow keep 8 freed blocks, so big buffers are reused. Any
`MALLOC_*`/`GLIBC_TUNABLES`, `PILLOW_BLOCKS_MAX` or `IDEFICS_ALLOCATOR=default` wins. Returns what it changed.
"""

from __future__ import annotations

import os

ENV = "IDEFICS_ALLOCATOR"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD, TRIM_THRESHOLD, PILLOW_BLOCKS = 256 * 2**20, 2**30, 8

_done: list[str] | None = None


def tune() -> list[str]:
    """Tune malloc and Pillow once; the names of what was changed."""
    global _done
    if _done is not None:
        return _done
    changed: list[str] = []
    if os.environ.get(ENV, "").strip().lower() != "default":
        if not any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ) and _mallopt():
            changed.append("malloc")
        if "PILLOW_BLOCKS_MAX" not in os.environ and _pillow():
            changed.append("pillow")
    _done = changed
    return changed


def _mallopt() -> bool:
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
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _pillow() -> bool:
    from PIL import Image

    if Image.core.get_blocks_max() >= PILLOW_BLOCKS:
        return False
    Image.core.set_blocks_max(PILLOW_BLOCKS)
    return True
