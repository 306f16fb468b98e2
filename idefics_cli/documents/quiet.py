"""Quiet decoding: decoders' chatter kept off stderr, and a bound on how long one decoder call may take.

Contract:
- `decoding(fn)` runs `fn()` in a helper thread with file descriptor 2 pointed at /dev/null (C libraries
  such as libtiff, libheif and MuPDF write there past any Python redirection) and the `PIL`, `pymupdf` and
  `pillow_heif` loggers silent. The redirection is process-wide and counted under a lock: it holds while any
  thread decodes, and `sys.stderr` (when it is fd 2) then writes to a duplicate of the real stderr, so the
  tool's own lines from every thread still get out. IDEFICS_DEBUG=1 leaves stderr and the loggers alone.
- A call still running after IDEFICS_DECODE_TIMEOUT seconds (default 30) raises `DecodeTimeout`; it is
  abandoned (a daemon thread). MuPDF, which holds the GIL, runs in worker processes instead (worker.py).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..process import debug

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
_LOGGERS = ("PIL", "pymupdf", "pillow_heif")
_lock = threading.Lock()
_depth = 0
_saved: int | None = None  # the real fd 2 while redirected
_swap: tuple | None = None  # (sys.stderr before, its stand-in writing to the real fd 2)
_loggers_quiet = False


class DecodeTimeout(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"took longer than {seconds:g} s")
        self.seconds = seconds


def timeout() -> float:
    try:
        value = float(os.environ.get("IDEFICS_DECODE_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def _quiet_loggers() -> None:
    global _loggers_quiet
    if _loggers_quiet:
        return
    _loggers_quiet = True
    for name in _LOGGERS:  # "More samples per pixel than can be decoded: 65535" is Pillow's logger.error
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _enter() -> None:
    global _depth, _saved, _swap
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            saved = os.dup(2)
        except OSError:
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            os.close(saved)
            return
        _saved = saved
        current = sys.stderr
        try:
            on_fd2 = current is not None and current.fileno() == 2
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            on_fd2 = False
        if on_fd2:
            stand_in = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), encoding=current.encoding,
                                        errors=current.errors, line_buffering=True, write_through=True)
            _swap = (current, stand_in)
            sys.stderr = stand_in


def _exit() -> None:
    global _depth, _saved, _swap
    with _lock:
        _depth -= 1
        if _depth > 0 or _saved is None:
            return
        if _swap is not None:
            before, stand_in = _swap
            try:
                stand_in.flush()
            except (OSError, ValueError):
                pass
            if sys.stderr is stand_in:
                sys.stderr = before
            _swap = None  # not closed: a thread may still hold it; it closes when the last reference goes
        os.dup2(_saved, 2)
        os.close(_saved)
        _saved = None


def decoding(fn: Callable[[], T]) -> T:
    """`fn()` in a helper thread with decoder chatter silenced, given up with `DecodeTimeout` after `timeout()` s."""
    quiet = not debug()
    if quiet:
        _quiet_loggers()
    result: list = []

    def work() -> None:
        if quiet:
            _enter()
        try:
            result.append((True, fn()))
        except BaseException as e:  # handed to the caller's thread
            result.append((False, e))
        finally:
            if quiet:
                _exit()
            done.set()

    done = threading.Event()
    seconds = timeout()
    start = time.monotonic()
    thread = threading.Thread(target=work, name="idefics-decode", daemon=True)
    thread.start()
    # a decoder that holds the GIL is not interrupted: it is given up once it returns, past its bound
    if not done.wait(seconds) or not result or time.monotonic() - start > seconds:
        raise DecodeTimeout(seconds)
    ok, value = result[0]
    if ok:
        return value
    raise value
