"""Writers: JSONL records and atomic files that survive crashes (docs/batching.md).

Contract: `RecordLog(path)` appends one fsynced-soon JSONL line per `write()`, and on open drops a torn last line
and reads back the valid records (`existing`). `OutputLock(path)` is an exclusive non-blocking `flock` (a second
process gets a usage error). `atomic_write` writes through a temporary file and a rename; `safe_join(root, rel)`
never leaves root. Files follow the umask (0666 & ~umask).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

from ..errors import IdeficsError, UsageError


class OutputLock:
    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> OutputLock:
        """Take the lock or raise a usage error naming the output another process writes."""
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(f"another idefics process is writing to {self.path.removesuffix('.lock')}",
                                 "wait for it to finish, or choose another --out") from None
            try:  # the holder before us may have removed the file after we opened it: lock the one on disk
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # removed while still held, so no one can lock a file that is going away
            os.close(self.fd)
            self.fd = None


def output_error(path: str, exc: OSError) -> IdeficsError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return IdeficsError("output_error", f"cannot write output: {reason}", "check free space and permissions",
                        path=path)


class RecordLog:
    """An append-only JSONL file of records, crash-safe and resumable."""

    def __init__(self, path: str, fsync_every: float = 2.0):
        self.path = path
        self.fsync_every = fsync_every
        self.existing: list[dict] = []
        try:
            self._repair_and_read()
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise output_error(path, exc) from exc
        self.last_sync = time.monotonic()

    def _repair_and_read(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):  # a torn last line from a crash: drop it
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.existing.append(record)

    def write(self, record: dict) -> None:
        try:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name): let JSON escape them
            line = (json.dumps(record) + "\n").encode()
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(28, "short write")
            if time.monotonic() - self.last_sync >= self.fsync_every:
                os.fsync(self.fd)
                self.last_sync = time.monotonic()
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


def umask() -> int:
    """The process umask, read without changing it (from /proc where there is one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Give the files of a folder just written by another library (transformers saves weights 0600) the umask's mode."""
    mode = 0o666 & ~umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private; the output should follow the umask
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise output_error(path, exc) from exc


def safe_join(root: str, rel: str) -> str:
    """A path under root for rel, whatever rel holds: never outside root."""
    parts = []
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", ".", ".."):
            continue
        part = part.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        part = "".join(ch if ch.isprintable() else "_" for ch in part).lstrip(".") or "_"
        parts.append(part[:200])
    path = os.path.join(os.path.abspath(root), *(parts or ["_"]))
    assert os.path.commonpath([os.path.abspath(root), path]) == os.path.abspath(root)
    return path
