"""Batch: which pages to do, in what order, and the items the prefetcher hands the model (prefetch.py).

Contract: `walk(inputs)` expands files, folders (recursive, hidden entries skipped, symlink loops safe) and globs
into de-duplicated `Input(path, rel)`s; `in_shard` puts a document in shard `sha1(rel) % count`; `done_keys` and
`needs_model` tell what is already done. `PageTask`, `Batch`, `BlankPage`, `Failure` and `DocumentDone` are what
prefetch.py hands on.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import IdeficsError

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
    """Whether a file met while expanding a folder or glob is a supported document: by extension, then magic bytes."""
    from ..documents import sniff

    if path.lower().endswith(DOCUMENT_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            return sniff(f.read(1024)) is not None
    except OSError:
        return False


def walk(inputs: list[str], skipped: list[str] | None = None) -> tuple[list[Input], list[IdeficsError]]:
    """(documents, errors for inputs that matched nothing): explicit inputs in the order given, each expansion
    sorted by relative path; files an expansion meets that are not documents are appended to `skipped`."""
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
    fixed = itertools.takewhile(lambda part: not GLOB_CHARS & set(part), pattern.split(os.sep))
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
    from ..errors import UsageError

    if not spec:
        return None
    try:
        index, count = (int(x) for x in spec.split("/"))
        if count < 1 or not 0 <= index < count:
            raise ValueError(spec)
    except ValueError:
        raise UsageError(f"bad --shard {spec!r}", "use I/N with 0 <= I < N, e.g. 0/4") from None
    return index, count


def done_keys(records: list[dict]) -> set[tuple]:
    return {(r.get("sha256"), r.get("page"), r.get("settings")) for r in records if r.get("status") == "ok"}


def needs_model(docs: list[Input], open_doc, select_pages, is_done) -> bool:
    """Whether any chosen page of `docs` is still to be done (stdin always is); a document that cannot be opened
    or has none of the chosen pages needs no model (it fails again, as an error record)."""
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
