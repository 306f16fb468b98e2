"""Batch: which pages to do, in what order, and the batches a background thread builds ahead of the model.

Contract: `walk(inputs)` expands files, folders (recursive, hidden entries skipped, symlink loops safe) and globs
into de-duplicated `Input(path, rel)`s; `in_shard` puts a document in shard `sha1(rel) % count`. `read_document` is
the one loop that opens a document, chooses its pages and renders them. Iterating `Prefetcher(...)` yields in order
`Batch`es, `Failure`s, `BlankPage`s and `DocumentDone`s, built one batch ahead of the model (docs/batching.md).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field

from ..ahead import WorkAhead
from ..errors import IdeficsError, UsageError, classify

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Input:
    path: str
    rel: str


DOCUMENT_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".bmp", ".dib", ".tif",
                       ".tiff", ".jp2", ".jpx", ".j2k", ".j2c", ".jpf", ".pbm", ".pgm", ".ppm", ".pnm", ".avif",
                       ".heic", ".heif", ".hif", ".psd", ".psb", ".xps", ".oxps", ".epub", ".mobi", ".fb2", ".cbz",
                       ".svg")


def is_document(path: str) -> bool:
    """Whether a file met while expanding a folder or glob is a supported document: a regular file (a named pipe
    would block), by extension, then magic bytes."""
    from ..documents import sniff_file

    with suppress(OSError):  # a dangling link or a loop is judged by its name, and gets its record
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
    if path.lower().endswith(DOCUMENT_EXTENSIONS):
        return True
    try:
        return sniff_file(path) is not None
    except OSError:
        return False


def walk(inputs: list[str], skipped: list[str] | None = None) -> tuple[list[Input], list[IdeficsError]]:
    """(documents, errors for inputs that matched nothing and folders that cannot be read): explicit inputs in the
    order given, each expansion sorted by relative path; files an expansion meets that are not documents are
    appended to `skipped`."""
    found: dict[str, Input] = {}
    errors, skipped = [], [] if skipped is None else skipped

    def add(items: list[Input]) -> None:
        for item in sorted(items, key=lambda i: (i.rel, i.path)):
            real = os.path.realpath(item.path)
            if real in found:  # one document under two names: the file itself rather than a link to it
                if os.path.islink(found[real].path) and not os.path.islink(item.path):
                    found[real] = item
                continue
            if is_document(item.path):
                found[real] = item
            else:
                skipped.append(item.path)

    for given in inputs:
        if given == "-":
            found.setdefault("-", Input("-", "stdin"))
        elif os.path.isdir(given):
            add([Input(path, os.path.relpath(path, given)) for path in _walk_dir(given, errors)])
        elif os.path.lexists(given) or not (GLOB_CHARS & set(given)):
            if not os.path.exists(given):
                errors.append(IdeficsError("not_found", "no such file or folder", path=given))
            else:
                found.setdefault(os.path.realpath(given), Input(given, os.path.basename(given)))
        else:
            root = _glob_root(given)
            matches = [p for p in glob.glob(given, recursive=True) if os.path.isfile(p)]
            if not matches:
                errors.append(IdeficsError("not_found", "the pattern matched no file", path=given))
            add([Input(path, os.path.relpath(path, root)) for path in matches])
    return list(found.values()), errors


def _glob_root(pattern: str) -> str:
    fixed = itertools.takewhile(lambda part: not GLOB_CHARS & set(part), pattern.split(os.sep))
    return os.sep.join(fixed) or "."


def _walk_dir(root: str, errors: list[IdeficsError]) -> Iterator[str]:
    """The files under root; a folder that cannot be listed gets an error rather than being passed over."""
    def unreadable(exc: OSError) -> None:
        code = "permission_denied" if isinstance(exc, PermissionError) else "not_found"
        errors.append(IdeficsError(code, f"cannot read the folder ({exc.strerror})", path=exc.filename))

    seen = set()
    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(folder, name)


def in_shard(rel: str, index: int, count: int) -> bool:
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()
    return int(digest, 16) % count == index


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """`"I/N"` (ASCII digits, 0 <= I < N) as (I, N); None for no shard; anything else (`""` too: an unset variable
    in a job array must not run every document in every job) a UsageError."""
    if spec is None:
        return None
    if isinstance(spec, str) and not spec.strip():
        raise UsageError("--shard is empty", "use I/N with 0 <= I < N, e.g. 0/4 (is the variable that gives it set?)")
    m = re.fullmatch(r"\s*([0-9]{1,18})\s*/\s*([0-9]{1,18})\s*", spec, re.ASCII) if isinstance(spec, str) else None
    if m is None or not 0 <= int(m[1]) < int(m[2]):
        shown = repr(spec) if len(repr(spec)) <= 40 else repr(spec)[:37] + "..."
        raise UsageError(f"bad --shard {shown}", "use I/N with 0 <= I < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def needs_model(docs: list[Input], open_doc, select_pages, is_done) -> bool:
    """Whether any chosen page of `docs` is still to be done (stdin always is); a document that cannot be opened
    or has none of the chosen pages needs no model (it fails again, as an error record)."""
    for item in docs:
        if item.path == "-":
            return True
        with closing(read_document(item, open_doc, select_pages, is_done)) as found:
            head = next(found)  # nothing is rendered: the generator is closed before its first page
        if isinstance(head, DocumentDone) and not all(is_done(head.sha256, page) for page in head.pages):
            return True
    return False


@dataclass
class PageTask:
    input: Input
    sha256: str
    page: int
    pages: int
    warnings: list[str] = field(default_factory=list)
    seq: int | None = None  # its place in the run's record order (the prefetcher's read order)


@dataclass
class BlankPage:
    """A page that rendered as one flat colour: recorded with empty text, never sent to the model."""

    task: PageTask
    seq: int | None = None


@dataclass
class Batch:
    tasks: list[PageTask]
    images: list = field(default_factory=list)
    inputs: object = None
    preprocess_s: float = 0.0


@dataclass
class Failure:
    """A document or page that failed before the model: becomes an error record."""

    input: Input
    error: IdeficsError
    sha256: str = ""
    page: int = 0
    pages: int = 0
    seq: int | None = None


@dataclass
class DocumentDone:
    """All chosen pages of a document have been queued (the writer can finish its .md after them)."""

    input: Input
    sha256: str
    pages: list[int]
    page_count: int
    seq: int | None = None


def read_document(item: Input, open_doc, select_pages, is_done) -> Iterator:
    """A `Failure` if the document cannot be opened or its pages chosen; else its `DocumentDone` (the chosen pages)
    first, then per chosen page not done yet a `Failure`, a `BlankPage` or `(PageTask, image)`."""
    try:
        doc = open_doc(item.path)
    except Exception as exc:  # noqa: BLE001 - recorded for the document
        yield Failure(item, classify(exc, item.path, "read"))
        return
    with doc:
        try:
            chosen = select_pages(doc)
        except Exception as exc:  # noqa: BLE001
            yield Failure(item, classify(exc, item.path, "read"), doc.sha256, 0, doc.page_count)
            return
        yield DocumentDone(item, doc.sha256, chosen, doc.page_count)
        for page in chosen:
            if is_done(doc.sha256, page):
                continue
            try:
                image = doc.render(page)
            except Exception as exc:  # noqa: BLE001 - recorded for the page
                yield Failure(item, classify(exc, item.path, "read"), doc.sha256, page, doc.page_count)
                continue
            task = PageTask(item, doc.sha256, page, doc.page_count, doc.warnings(page))
            yield BlankPage(task) if "blank_page" in task.warnings else (task, image)  # a blank needs no model
            image = None


def build_batch(pages: list, build) -> list:
    """[the `Batch` of rendered (PageTask, image) pages with `build(images)` as its inputs], or a `Failure` a page
    when `build` fails."""
    t0 = time.perf_counter()
    batch = Batch([t for t, _ in pages], [im for _, im in pages])
    try:
        batch.inputs = build(batch.images)
    except Exception as exc:  # noqa: BLE001 - recorded per page
        return [Failure(t.input, classify(exc, t.input.path, "read"), t.sha256, t.page, t.pages, t.seq)
                for t in batch.tasks]
    batch.preprocess_s = time.perf_counter() - t0
    return [batch]


class Prefetcher:
    """Documents in, ready batches out, built one batch ahead of the model in one background thread."""

    def __init__(self, docs: list[Input], open_doc, select_pages, is_done, build, batch_size: int, on_pages=None):
        self.docs, self.open_doc, self.select_pages, self.is_done = docs, open_doc, select_pages, is_done
        self.build, self.on_pages = build, on_pages  # on_pages(total, skipped): per opened document
        self.batch_size = batch_size
        self.pending: list[tuple[PageTask, object]] = []  # rendered pages not yet in a batch
        self.finished: list[DocumentDone] = []
        self.read = 0  # items read so far: the next one's `seq`
        self.passed = 0
        # the turn is its one place: claimed before a build, released when the model's thread takes the batch
        self._work = WorkAhead("idefics-prefetch", depth=1, places=1)

    def start(self) -> Prefetcher:
        """Start the thread now (else the first iteration does): work begins before the model is there to take it."""
        self._work.start(self._produce)
        return self

    def close(self) -> None:
        """Stop and join the thread (a prefetcher never iterated: the load it overlapped failed)."""
        self._work.stop()
        self._work.join(timeout=5)

    def __iter__(self) -> Iterator[Batch | Failure | BlankPage | DocumentDone]:
        self.start()
        try:
            for item in self._work:
                if isinstance(item, Batch):
                    self._work.release()  # the model takes it: the next build may start (during this prefill)
                yield item
                item = None  # this batch's pixels are freed before the next one is waited for
        finally:
            self.close()

    def _produce(self, work: WorkAhead) -> None:
        for item in self.docs:
            if work.stopped or not self._document(item):
                return
        self._flush(final=True)

    def _next_batch(self, final: bool) -> list | None:
        """`batch_size` pending pages of one size; else, once 2 batches wait, at the end, or when the oldest page
        was passed over by a batch already, the oldest page's size first, topped up with the oldest others (a vision
        call per size). So no page waits more than a batch behind later ones: records are written in read order."""
        pending, size = self.pending, self.batch_size
        groups: dict = {}
        for k, (_, image) in enumerate(pending):
            groups.setdefault(getattr(image, "size", None), []).append(k)
        chosen = next((ks[:size] for ks in groups.values() if len(ks) >= size), None)
        if pending and (final or len(pending) >= 2 * size if chosen is None else 0 not in chosen and self.passed):
            first = groups[getattr(pending[0][1], "size", None)]
            chosen = (first + [k for k in range(len(pending)) if k not in set(first)])[:size]
        if chosen is None:
            return None
        self.passed = 0 if 0 in chosen else self.passed + 1  # batches that left the oldest page behind
        take = set(chosen)
        out = [pending[k] for k in sorted(take)]
        pending[:] = [p for k, p in enumerate(pending) if k not in take]
        return out

    def _flush(self, final: bool = False) -> bool:
        """Hand over the batches the pending pages allow, then the documents none of whose pages still wait."""
        while (ready := self._next_batch(final)) is not None:
            if self._work.claim() is None:  # every batch built so far taken by the model
                return False
            try:
                built = build_batch(ready, self.build)
            except BaseException:
                self._work.release()  # this batch never reaches the model: the next build may start
                raise
            ready = None
            if not isinstance(built[0], Batch):
                self._work.release()
            if not all(self._work.put(item) for item in built):
                return False
            built = None
        while self.finished and all(t.input != self.finished[0].input for t, _ in self.pending):
            if not self._work.put(self.finished.pop(0)):
                return False
        return True

    def _document(self, item: Input) -> bool:
        done = None
        with closing(read_document(item, self.open_doc, self.select_pages, self.is_done)) as pages:
            for found in pages:
                if isinstance(found, DocumentDone):
                    done = found
                    if self.on_pages:
                        self.on_pages(len(done.pages), sum(self.is_done(done.sha256, p) for p in done.pages))
                    continue
                self._number(found[0] if isinstance(found, tuple) else found)
                if isinstance(found, tuple):
                    self.pending.append(found)
                    ok = self._flush()
                else:  # a Failure, or a BlankPage: recorded at once, before its DocumentDone
                    ok = self._work.put(found)
                found = None
                if not ok:
                    return False
        if done is not None:
            self.finished.append(self._number(done))  # after its pages
        return self._flush()

    def _number(self, item):
        """Give an item read its `seq`: the pipeline writes records in this order, whatever the batches' order."""
        item.seq, self.read = self.read, self.read + 1
        return item
