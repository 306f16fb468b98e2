"""Batch: which pages to do, in what order, and the background queue that feeds the model.

Contract:
- `walk(inputs)` expands files, folders (recursive; hidden entries skipped; symlinked folders followed
  once, so loops are safe) and quoted globs into a de-duplicated list of `Input(path, rel)`: explicit
  inputs in the order given, each expansion sorted; files an expansion meets that are not supported
  documents (by extension, then magic bytes) are skipped, not listed. `rel` is the path relative to the
  folder or glob root it came from (used for `--out DIR` and shards).
- `in_shard(rel, index, count)`: a document belongs to shard `sha1(rel) % count`, stable as files are added.
- `done_keys(records)`: the (sha256, page, settings) keys that already have an `ok` record;
  `needs_model(docs, ...)`: whether any chosen page is still to be done (else the model need not load).
- `prefetch(...)` runs document opening, rasterization and preprocessing in a background thread and
  yields ready `Batch`es (or `Failure`s, or `BlankPage`s that need no model) through a bounded queue, so
  memory stays flat in the number of pages and the model never waits on the CPU. Batches group pages of one
  pixel size from a look-ahead window of at most two batches of rendered pages (full batches always; mixed
  sizes only when the window is full or at the end); a `DocumentDone` follows the batches holding all of its
  pages.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Queue

from .errors import IdeficsError, classify

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Input:
    path: str
    rel: str


DOCUMENT_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".bmp", ".dib", ".tif",
                       ".tiff")


def is_document(path: str) -> bool:
    """Whether a file met while expanding a folder or glob is a supported document: by extension, then magic bytes."""
    from .documents import sniff

    if path.lower().endswith(DOCUMENT_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            return sniff(f.read(1024)) is not None
    except OSError:
        return False


def walk(inputs: list[str], skipped: list[str] | None = None) -> tuple[list[Input], list[IdeficsError]]:
    """Expand inputs; returns (documents, errors for inputs that matched nothing).

    Explicit inputs keep the order given; what one folder or glob expands to is sorted by relative path. Files
    of an expansion that are not supported documents (`is_document`) are left out and appended to `skipped`;
    a file named explicitly is always kept (opening it reports what is wrong with it).
    """
    found: dict[str, Input] = {}
    errors = []

    def add(items: list[Input]) -> None:
        for item in sorted(items, key=lambda i: (i.rel, i.path)):
            real = os.path.realpath(item.path)
            if real in found:
                continue
            if not is_document(item.path):
                if skipped is not None:
                    skipped.append(item.path)
                continue
            found[real] = item

    for given in inputs:
        if given == "-":
            found.setdefault("-", Input("-", "stdin"))
        elif os.path.isdir(given):
            add([Input(path, os.path.relpath(path, given)) for path in _walk_dir(given)])
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
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _walk_dir(root: str) -> Iterator[str]:
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
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
    from .errors import UsageError

    if not spec:
        return None
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"bad --shard {spec!r}", "use I/N with 0 <= I < N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"bad --shard {spec!r}", "use I/N with 0 <= I < N, e.g. 0/4")
    return index, count


def done_keys(records: list[dict]) -> set[tuple]:
    return {(r.get("sha256"), r.get("page"), r.get("settings")) for r in records if r.get("status") == "ok"}


def needs_model(docs: list[Input], open_doc, select_pages, is_done) -> bool:
    """Whether any chosen page of `docs` is still to be done (stdin always counts as work).

    Stops at the first document with work left; a document that cannot be opened, or has none of the chosen
    pages, needs no model (it fails again, as an error record).
    """
    for item in docs:
        if item.path == "-":
            return True
        try:
            doc = open_doc(item.path)
        except Exception:  # noqa: BLE001 - recorded when the pipeline meets it
            continue
        with doc:
            try:
                chosen = select_pages(doc)
            except Exception:  # noqa: BLE001
                continue
            if not all(is_done(doc.sha256, page) for page in chosen):
                return True
    return False


@dataclass
class PageTask:
    input: Input
    sha256: str
    page: int
    pages: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class BlankPage:
    """A page that rendered as one flat colour: recorded with empty text, never sent to the model."""

    task: PageTask


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


@dataclass
class DocumentDone:
    """All chosen pages of a document have been queued (the writer can finish its .md after them)."""

    input: Input
    sha256: str
    pages: list[int]
    page_count: int


def prefetch(docs: list[Input], open_doc, select_pages, is_done, build, batch_size: int, depth: int = 1,
             stop: threading.Event | None = None,
             on_pages=None) -> Iterator[Batch | Failure | BlankPage | DocumentDone]:
    """Yield batches built in a background thread; at most `depth` batches wait in the queue."""
    import time

    queue: Queue = Queue(maxsize=max(depth, 1))
    stop = stop or threading.Event()
    sentinel = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Exception:  # queue.Full
                continue
        return False

    pending: list[tuple[PageTask, object]] = []  # the look-ahead window: rendered pages not yet in a batch
    finished: list[DocumentDone] = []

    def next_batch(final: bool) -> list | None:
        """`batch_size` pages of one size if the window holds them; else, once the window is full (2 batches) or
        at the end, the oldest page's size first, topped up with the oldest others (a vision call per size)."""
        groups: dict = {}
        for k, (_, image) in enumerate(pending):
            groups.setdefault(getattr(image, "size", None), []).append(k)
        chosen = next((ks[:batch_size] for ks in groups.values() if len(ks) >= batch_size), None)
        if chosen is None and pending and (final or len(pending) >= 2 * batch_size):
            first = groups[getattr(pending[0][1], "size", None)]
            chosen = (first + [k for k in range(len(pending)) if k not in set(first)])[:batch_size]
        if chosen is None:
            return None
        take = set(chosen)
        out = [pending[k] for k in sorted(take)]
        pending[:] = [p for k, p in enumerate(pending) if k not in take]
        return out

    def flush(final: bool = False) -> bool:
        """Queue the batches the window allows, then the documents none of whose pages still wait."""
        while (ready := next_batch(final)) is not None:
            t0 = time.perf_counter()
            batch = Batch([t for t, _ in ready], [im for _, im in ready])
            ready = None
            try:
                batch.inputs = build(batch.images)
                batch.preprocess_s = time.perf_counter() - t0
                ok = put(batch)
            except Exception as exc:  # noqa: BLE001 - recorded per page
                ok = all(put(Failure(t.input, classify(exc, t.input.path, "read"), t.sha256, t.page, t.pages))
                         for t in batch.tasks)
            batch = None
            if not ok:
                return False
        while finished and not any(t.input == finished[0].input for t, _ in pending):
            if not put(finished.pop(0)):
                return False
        return True

    def produce_document(item: Input) -> bool:
        try:
            doc = open_doc(item.path)
        except Exception as exc:  # noqa: BLE001 - recorded for the document
            return put(Failure(item, classify(exc, item.path, "read")))
        with doc:
            try:
                chosen = select_pages(doc)
            except Exception as exc:  # noqa: BLE001
                return put(Failure(item, classify(exc, item.path, "read"), doc.sha256, 0, doc.page_count))
            todo = [p for p in chosen if not is_done(doc.sha256, p)]
            if on_pages:
                on_pages(len(chosen), len(chosen) - len(todo))
            for page in todo:
                try:
                    image = doc.render(page)
                except Exception as exc:  # noqa: BLE001
                    if not put(Failure(item, classify(exc, item.path, "read"), doc.sha256, page, doc.page_count)):
                        return False
                    continue
                task = PageTask(item, doc.sha256, page, doc.page_count, doc.warnings(page))
                if "blank_page" in task.warnings:  # needs no model: recorded at once, before its DocumentDone
                    if not put(BlankPage(task)):
                        return False
                    continue
                pending.append((task, image))
                image = None
                if not flush():
                    return False
            finished.append(DocumentDone(item, doc.sha256, chosen, doc.page_count))
            return flush()

    def produce():
        try:
            for item in docs:
                if stop.is_set() or not produce_document(item):
                    return
            flush(final=True)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the consumer
            put(exc)
        finally:
            put(sentinel)

    thread = threading.Thread(target=produce, name="idefics-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is sentinel:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
