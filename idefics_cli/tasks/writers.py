"""Writers and sinks: where a transcription run's page records go, resumable and crash-safe (docs/batching.md).

Contract: a sink (a context manager) has `existing` (records already written), `write(record)`, `document_done(done)`,
`close()` and `records_name`. `JsonlSink` appends to a locked .jsonl file (a torn last line dropped; `OutputLock`:
a second process gets a usage error); `FolderSink` adds an atomically written `.md` per document;
`open_sink(out, docs, settings)` picks one for `--out`. `safe_join(root, rel)` never leaves root; files follow umask.
`same_file(path, other)`: whether a path to write is a file already in use (a path or an open descriptor).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import time
from collections import Counter

from ..errors import IdeficsError, UsageError, warning_line
from .records import trusted


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
            with contextlib.suppress(FileNotFoundError):  # the holder before us may have removed the file after we
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):  # opened it: lock the one on disk
                    self.fd = fd
                    return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # removed while still held, so no one can lock a file that is going away
            os.close(self.fd)
            self.fd = None


def same_file(path, other) -> bool:
    """Whether `path` is `other` (a path, or an open file descriptor) on disk; False when either cannot be read."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(other) if isinstance(other, int) else os.stat(other))
    except (OSError, ValueError, TypeError):
        return False


def output_error(path: str, exc: OSError) -> IdeficsError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return IdeficsError("output_error", f"cannot write output: {reason}", "check free space and permissions",
                        path=path)


def umask() -> int:
    """The process umask, read without changing it (from /proc where there is one)."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration), open("/proc/self/status") as f:
        return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Give the files of a folder just written by another library (transformers saves weights 0600) the umask's mode."""
    mode = 0o666 & ~umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def replace_file(path: str, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) beside `path`, in the umask's mode and synced, then rename it onto `path`: a failed
    write leaves what was there and no temporary file (OSError). A symlink is followed as `>` does: the link stays
    and its target (made if missing) is replaced; a loop of links is ELOOP. A FIFO or device is written into, as `>`
    does, never replaced (`/dev/null` stays a device)."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.islink(target):  # realpath stops inside a loop
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG  # /dev/stdout: the pipe itself
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO, device or socket: written into, never replaced
        with open(target, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private; the output should follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, text: str) -> None:
    try:
        replace_file(path, text)
    except OSError as exc:
        raise output_error(path, exc) from exc


NAME_MAX = 255  # bytes in one file name


def safe_join(root: str, rel: str) -> str:
    """A path under root for rel, whatever rel holds: never outside root; each name printable UTF-8, cut in its
    middle to NAME_MAX bytes, its last 24 characters kept."""
    parts = []
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", ".", ".."):
            continue
        part = part.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        part = "".join(ch if ch.isprintable() else "_" for ch in part).lstrip(".") or "_"
        while len(part.encode()) > NAME_MAX:  # cut in the middle: the end (" (2).md") tells names apart
            part = part[:-25] + part[-24:]
        parts.append(part)
    path = os.path.join(os.path.abspath(root), *(parts or ["_"]))
    assert os.path.commonpath([os.path.abspath(root), path]) == os.path.abspath(root)
    return path


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
OUT_HINT = "give a .jsonl file (--out pages.jsonl) or a folder (--out transcripts/; end a dotted folder name with /)"


class Sink:
    """No records before, none kept: the base of every sink, and alone (`NullSink`) a library run without `out`."""

    existing: list[dict] = []
    records_name: str | None = None

    def write(self, record: dict) -> None:
        pass

    def document_done(self, done) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NullSink = Sink


class StdoutSink(Sink):
    """JSONL on stdout when piped; each page's text under a header on a terminal."""

    def __init__(self, out, as_json: bool):
        self.out, self.as_json = out, as_json
        self.records_name = "the records on stdout" if as_json else None  # text on a terminal shows no errors

    def write(self, record: dict) -> None:
        if self.as_json:
            self.out.json_line(record)
        elif record["status"] == "ok":
            for code in record.get("warnings") or ():
                self.out.warn(warning_line(code, record["path"], record["page"]))
            self.out.write(f"==> {record['path']} [page {record['page']}/{record['pages']}] <==\n{record['text']}\n\n")


def open_sink(out: str, docs: list, settings: str) -> Sink:
    """The sink for `--out`: a .jsonl file or a folder; anything else is a usage error, an unwritable one an
    `output_error`, both raised here, before any model loads."""
    if out.endswith(JSONL_SUFFIXES):
        return JsonlSink(out)
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return FolderSink(out, docs, settings)
    if os.path.lexists(out) or os.path.splitext(os.path.basename(out))[1]:  # a file, or a name with a suffix
        raise UsageError(f"--out {out} is neither a .jsonl file nor a folder", OUT_HINT)
    return FolderSink(out, docs, settings)


class JsonlSink(Sink):
    """Records appended to one locked .jsonl file, crash-safe and resumable (a torn last line is dropped)."""

    def __init__(self, path: str, fsync_every: float = 2.0):
        self.lock = OutputLock(os.path.realpath(path) + ".lock")  # one lock for a file and a link to it
        self.path = self.records_name = path
        self.fsync_every, self.existing, self.fd = fsync_every, [], None
        try:
            self.lock.acquire()
            try:
                self._repair_and_read()
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            except BaseException:
                self.lock.release()
                raise
        except OSError as exc:
            raise output_error(path, exc) from exc
        self.last_sync = time.monotonic()

    def _repair_and_read(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):  # a torn last line from a crash: dropped; a whole record (an editor's save
                try:  # dropped its newline): kept, the newline added
                    whole = isinstance(json.loads(data[end:]), dict)
                except (ValueError, RecursionError):  # RecursionError: a line nested past the parser's depth
                    whole = False
                f.write(b"\n") if whole else f.truncate(end)
                end = len(data) if whole else end
                f.flush()
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                self.existing.append(json.loads(line))
        self.existing = [record for record in self.existing if isinstance(record, dict)]

    def write(self, record: dict) -> None:
        try:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name): let JSON escape them
            line = (json.dumps(record) + "\n").encode()
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(28, "short write")
            if time.monotonic() - self.last_sync >= self.fsync_every:
                os.fsync(self.fd)
                self.last_sync = time.monotonic()
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def close(self) -> None:
        try:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self.fd)
                os.close(self.fd)
                self.fd = None
        finally:
            self.lock.release()


class FolderSink(JsonlSink):
    """records.jsonl plus one Markdown file per document, mirroring the input tree."""

    def __init__(self, folder: str, docs: list, settings: str):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise output_error(folder, exc) from exc
        super().__init__(os.path.join(folder, "records.jsonl"))
        self.folder, self.settings = folder, settings
        # this run's records by (path, sha256), dropped once the .md is written; records already in the file
        # by sha256 and kept, since byte-identical files share them (resume is by content)
        self.texts: dict[tuple[str, str], dict[int, dict]] = {}
        self.earlier: dict[str, dict[int, dict]] = {}
        for record in filter(self._usable, self.existing):
            self.earlier.setdefault(record.get("sha256", ""), {})[record["page"]] = record
        stems = [os.path.splitext(d.rel)[0] for d in docs]
        counts = Counter(os.path.splitext(rel)[0] for rel in {d.rel for d in docs})  # stems of different names
        names = [stem if counts[stem] == 1 else d.rel for d, stem in zip(docs, stems)]
        own = tuple(os.path.join(os.path.abspath(folder), n, "") for n in ("records.jsonl", "records.jsonl.lock"))
        names = [f"_{name}" if safe_join(folder, name).startswith(own) else name for name in names]  # not into those
        # one .md name twice (one relative path under two folders, or names safe_join makes one), or a .md named as a
        # folder other .md files go into: "NAME (2).md", or the next number no other document's .md has
        root, taken, self.md_rel = os.path.abspath(folder), set(), {}
        for name in names:
            path = os.path.dirname(safe_join(folder, name + ".md"))
            while path != root:
                taken.add(path)
                path = os.path.dirname(path)
        for d, name in zip(docs, names):
            n = 1
            while (md := (f"{name} ({n})" if n > 1 else name) + ".md") and safe_join(folder, md) in taken:
                n += 1
            taken.add(safe_join(folder, md))
            self.md_rel[(d.path, d.rel)] = md

    def _usable(self, record: dict) -> bool:
        return record.get("settings") == self.settings and trusted(record) and record["page"] > 0

    def write(self, record: dict) -> None:
        super().write(record)
        if self._usable(record):
            self.texts.setdefault((record["path"], record.get("sha256", "")), {})[record["page"]] = record

    def document_done(self, done) -> None:
        pages = {**self.earlier.get(done.sha256, {}), **self.texts.pop((done.input.path, done.sha256), {})}
        parts = []
        chosen = set(done.pages)
        earlier = [page for page in pages if page not in chosen]  # answered by a run with other --pages
        for page in sorted({*done.pages, *earlier}) if earlier else done.pages:
            record = pages.get(page)
            if record and record.get("status") == "ok":
                text = record["text"] if record.get("markdown") is None else record["markdown"]  # DocTags' Markdown
                parts.append(f"<!-- page {page} -->\n\n{text.strip()}\n")
            else:
                err = (record or {}).get("error") or {"code": "missing", "message": "not transcribed"}
                parts.append(f"<!-- page {page}: error [{err['code']}] {err['message']} -->\n")
        rel = done.input.rel
        atomic_write(safe_join(self.folder, self.md_rel.get((done.input.path, rel), rel + ".md")), "\n".join(parts))
