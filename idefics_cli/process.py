"""Process-wide settings: changed by the commands, left alone for a program that uses the library.

`tune_process()` opts this process in (the commands call it; a program may): TOKENIZERS_PARALLELISM=false unless set,
library warnings ignored, bitsandbytes and kernels loggers at errors (unless IDEFICS_DEBUG=1). `quiet_hub()`,
`quiet_loaded()` and `tune_allocators()` do their part as libraries load, only in an opted-in process. Idempotent.
"""

from __future__ import annotations

import os
import warnings

_tuned = False


def debug() -> bool:
    return bool(os.environ.get("IDEFICS_DEBUG"))


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
    """Opted in: allocator.tune() (what it changed); else nothing."""
    if not _tuned:
        return []
    from . import allocator

    return allocator.tune()
