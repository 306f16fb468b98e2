"""Sinks: where a transcription run's page records go, resumable and crash-safe (docs/batching.md).

Contract: a sink (a context manager) has `existing` (records already written), `write(record)`, `document_done(done)`,
`close()` and `records_name` (where its records can be read, or None). `JsonlSink` appends to a locked .jsonl file;
`FolderSink` adds one atomically written `.md` per document; `StdoutSink` and `NullSink`. `open_sink(out, docs,
settings)` picks one for `--out`, raising `UsageError` or `output_error` at once.
"""
from __future__ import annotations

import os
from collections import Counter

from ..errors import UsageError, warning_line
from .writers import OutputLock, RecordLog, atomic_write, output_error, safe_join

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
    """Records appended to one .jsonl file, with a lock and crash-safe resume."""

    def __init__(self, path: str):
        self.lock = OutputLock(path + ".lock")
        try:
            self.lock.acquire()
        except OSError as exc:
            raise output_error(path, exc) from exc
        self.records_name = path
        try:
            self.log = RecordLog(path)
        except BaseException:
            self.lock.release()
            raise
        self.existing = self.log.existing

    def write(self, record: dict) -> None:
        self.log.write(record)

    def close(self) -> None:
        try:
            self.log.close()
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
        for record in self.existing:
            if self._usable(record):
                self.earlier.setdefault(record.get("sha256", ""), {})[record["page"]] = record
        stems = [os.path.splitext(d.rel)[0] for d in docs]
        counts = Counter(stems)  # not stems.count(): quadratic in the number of documents
        self.md_rel = {d.rel: (stem if counts[stem] == 1 else d.rel) + ".md" for d, stem in zip(docs, stems)}

    def _usable(self, record: dict) -> bool:
        return record.get("settings") == self.settings and bool(record.get("page"))

    def md_path(self, rel: str) -> str:
        return safe_join(self.folder, self.md_rel.get(rel, rel + ".md"))

    def write(self, record: dict) -> None:
        super().write(record)
        if self._usable(record):
            self.texts.setdefault((record["path"], record.get("sha256", "")), {})[record["page"]] = record

    def document_done(self, done) -> None:
        pages = {**self.earlier.get(done.sha256, {}), **self.texts.pop((done.input.path, done.sha256), {})}
        parts = []
        for page in done.pages:
            record = pages.get(page)
            if record and record.get("status") == "ok":
                text = record["text"] if record.get("markdown") is None else record["markdown"]  # DocTags' Markdown
                parts.append(f"<!-- page {page} -->\n\n{text.strip()}\n")
            else:
                err = (record or {}).get("error") or {"code": "missing", "message": "not transcribed"}
                parts.append(f"<!-- page {page}: error [{err['code']}] {err['message']} -->\n")
        atomic_write(self.md_path(done.input.rel), "\n".join(parts))
