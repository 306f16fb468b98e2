"""Worker processes for a decoder that cannot be interrupted (MuPDF holds the GIL in C): past its bound the
child is killed, and the run goes on.

Contract: `take()` gives an idle worker (or starts one: `python -c CHILD`, its stderr at /dev/null unless
IDEFICS_DEBUG=1), used by one thread until `give(worker)` hands it back. `worker.ask(request)` pickles `request`
to the child and returns its reply, raising `DecodeTimeout` past quiet.timeout() (the child is killed) and
`ChildProcessError` when the child died. `forget(key)` sends ("close" requests) to idle workers. All die at exit.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import subprocess
import sys
import threading

from idefics_cli.documents.quiet import DecodeTimeout, timeout
from idefics_cli.process import debug

CHILD = "from idefics_cli.documents.pdf import serve; serve()"
IDLE = 2  # idle workers kept for the next document
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_lock = threading.Lock()
_idle: list[Worker] = []
_alive: set[Worker] = set()


class Worker:
    def __init__(self):
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + path if path else _ROOT)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None if debug() else subprocess.DEVNULL, env=env)
        self.held: dict[int, None] = {}  # keys of the documents open in the child, oldest first
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="idefics-mupdf", daemon=True).start()
        with _lock:
            _alive.add(self)

    def _read(self) -> None:
        try:
            while True:
                self._replies.put(pickle.load(self.proc.stdout))
        except Exception:  # noqa: BLE001 - the end of the pipe: the child is gone
            self._replies.put(None)

    def send(self, request) -> None:
        pickle.dump(request, self.proc.stdin, protocol=5)
        self.proc.stdin.flush()

    def ask(self, request):
        seconds = timeout()
        try:
            self.send(request)
            reply = self._replies.get(timeout=seconds)
        except queue.Empty:
            self.kill()
            raise DecodeTimeout(seconds) from None
        except OSError:
            reply = None
        if reply is None:
            self.kill()
            raise ChildProcessError("MuPDF's process ended")
        return reply

    def kill(self) -> None:
        with _lock:
            _alive.discard(self)
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def take() -> Worker:
    with _lock:
        while _idle:
            worker = _idle.pop()
            if worker.proc.poll() is None:
                return worker
    return Worker()


def give(worker: Worker) -> None:
    with _lock:
        if worker in _alive and worker.proc.poll() is None and len(_idle) < IDLE:
            _idle.append(worker)
            return
    worker.kill()


def forget(key: int) -> None:
    with _lock:
        for worker in _idle:
            if key in worker.held:
                del worker.held[key]
                try:
                    worker.send((key, None, None))
                except OSError:
                    pass


@atexit.register
def _kill_all() -> None:
    for worker in list(_alive):
        worker.kill()
