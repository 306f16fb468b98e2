"""Decoding in worker processes: a decoder stuck in C (MuPDF holds the GIL) is killed at a bound, not waited on.

Contract: `Remote(path, kind, data, *args)` is a Document that `open_here(path, kind, data, *args)` opens and
renders in a worker process (stdout and stderr at /dev/null unless IDEFICS_DEBUG=1). An open or a render past
IDEFICS_DECODE_TIMEOUT seconds (default 30) kills the worker and raises `corrupt`; the next call takes a fresh
worker. One call holds one worker, so threads are safe; idle ones are reused; none outlives us.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from idefics_cli.documents.pages import NAMES, Document
from idefics_cli.errors import IdeficsError
from idefics_cli.process import debug

if TYPE_CHECKING:
    from PIL.Image import Image

CHILD = ("import PIL.Image, pymupdf; from idefics_cli.documents import open_here; "
         "from idefics_cli.documents.worker import serve; serve(open_here)")
DEFAULT_TIMEOUT = 30.0
IDLE = 2  # idle workers kept for the next call
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_keys = itertools.count(1)
_lock = threading.Lock()
_idle: list[Worker] = []
_alive: set[Worker] = set()


def timeout() -> float:
    try:
        value = float(os.environ.get("IDEFICS_DECODE_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


class Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH")))))
        ours, theirs = socket.socketpair()  # requests and replies; what a decoder prints goes where stderr goes
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())], env=env,
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=2 if debug() else subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.conn = Connection(ours.detach())
        self.key: int | None = None  # the document open in the child
        with _lock:
            _alive.add(self)
        with contextlib.suppress(EOFError, OSError):  # started and its imports done, outside the bound; else dead
            self.conn.recv()

    def ask(self, request):
        seconds = timeout()
        try:
            self.conn.send(request)
            if self.conn.poll(seconds):
                return self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise ChildProcessError("its decoder's process ended") from None
        except BaseException:  # interrupted: its late reply must not answer the next request
            self.kill()
            raise
        self.kill()  # past the bound: the same
        raise TimeoutError(f"took longer than {seconds:g} s")

    def kill(self) -> None:
        with _lock:
            _alive.discard(self)
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _take(key: int) -> Worker:
    """An idle worker, the one holding document `key` first; a new one when none is idle. Idle workers found dead
    are reaped (process waited for, connection closed)."""
    found, dead = None, []
    with _lock:
        for worker in sorted(_idle, key=lambda w: w.key != key):
            _idle.remove(worker)
            if worker.proc.poll() is None:
                found = worker
                break
            dead.append(worker)
    for worker in dead:
        worker.kill()
    return found or Worker()


def _give(worker: Worker) -> None:
    with _lock:
        if worker in _alive and worker.proc.poll() is None and len(_idle) < IDLE:
            _idle.append(worker)
            return
    worker.kill()


@atexit.register
def _kill_all() -> None:
    for worker in list(_alive):
        worker.kill()


class Remote(Document):
    """A document opened and rendered in a worker process (see the module docstring)."""

    def __init__(self, path: str, kind: str, data: bytes, *args):
        super().__init__(path, kind, data)
        self._key = next(_keys)
        self._args: tuple | None = (path, kind, data, *args)
        self.page_count, self.doc_warnings = self._call("open", f"not a readable {NAMES[kind]}",
                                                        f"the {NAMES[kind]} file {{}} to open, given up")

    def _call(self, page: int | str, what: str, slow: str):
        """The worker's reply on `page` ("open" or a number); `corrupt` as `what` when it ends, as `slow` (its
        "took longer than N s" in place of {}) past the bound."""
        worker = _take(self._key)
        try:
            ok, value, holds = worker.ask((self._key, page, None if worker.key == self._key else self._args))
            worker.key = self._key if holds else None
        except ChildProcessError as e:
            raise self._error("corrupt", f"{what} ({e})") from None
        except TimeoutError as e:
            raise self._error("corrupt", slow.format(e)) from None
        finally:
            _give(worker)
        if ok:
            return value
        if value is None:
            raise MemoryError
        raise self._error(*value)

    def render(self, page: int) -> Image:
        from PIL import Image as PILImage

        what = f"page {page} could not be decoded"
        mode, size, raw, self._warnings[page] = self._call(page, what, what + ": it {}, given up")
        return PILImage.frombytes(mode, size, raw)

    def close(self) -> None:
        self._args = None  # the worker closes it when it opens the next document


def serve(open_here) -> None:
    """A worker's loop: (key, page, args) in, replies out on the socket its argument names; `args` opens document
    `key` instead of the last."""
    conn = Connection(int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(True)  # ready
    doc = held = None
    while True:
        try:
            key, page, args = conn.recv()
        except EOFError:
            return
        try:
            if args is not None:
                if doc is not None:
                    doc.close()
                doc = held = None
                doc, held = open_here(*args), key
            if held != key:
                raise IdeficsError("corrupt", "the document was closed")
            if page == "open":
                reply = True, (doc.page_count, doc.doc_warnings)
            else:
                image = doc.render(page)
                reply = True, (image.mode, image.size, image.tobytes(), doc.warnings(page))
        except IdeficsError as e:
            reply = False, (e.code, e.message, e.hint)
        except MemoryError:
            reply = False, None
        conn.send((*reply, held == key))
