"""Transcription pipeline: pages in, page records out, through a sink that loses nothing.

Contract: `transcribe(engine, docs, sink, settings)` walks the documents' chosen pages through the
background prefetch queue, answers them in batches (pages of one size where possible, batch.py; the same
answers as one page at a time except where float rounding decides a near-tie, README), and hands each
finished `PageRecord` to the sink at once. The next batch is prepared (its pixels built, `Engine.prepare`)
while the model works on the current one, never further ahead, so at most two batches' pixels exist at
once, whatever the page count; the vision tower encodes them in same-shape chunks (vision.py). A failed
document or page becomes an error record and the run goes on; a blank page (one flat colour) is recorded
as "" with the warning `blank_page`, without the model; a batch that runs out of memory is retried
one page at a time, then that page without image splitting, before `out_of_memory` is recorded. Sinks:
`JsonlSink` (a records file, resumable), `FolderSink` (records.jsonl + one `.md` per document, written
atomically), `StdoutSink` (JSONL or text); `open_sink(out, ...)` picks one for `--out`, refusing a path that is
neither a `.jsonl` file nor a folder (usage) or cannot be written (`output_error`) before any model loads.
Returns a `Summary`; its `exit_status` is 0, 3 (partial) or 4 (nothing readable).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .batch import Batch, BlankPage, DocumentDone, Failure, Input, done_keys, prefetch
from .errors import ExitStatus, IdeficsError, classify, warning_line
from .records import PageRecord
from .writers import OutputLock, RecordLog, atomic_write, output_error, safe_join


@dataclass
class Settings:
    prompt: str
    max_new_tokens: int
    batch_size: int
    settings: str
    force: bool = False
    pages_spec: object = None
    password: str | None = None
    dpi: int | None = None


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    not_documents: int = 0  # files a folder or glob held that are not supported documents: skipped, not failed

    @property
    def exit_status(self) -> ExitStatus:
        if not self.failed:
            return ExitStatus.OK
        return ExitStatus.PARTIAL if self.ok + self.skipped else ExitStatus.INPUT

    def failure_lines(self, records: str | None, limit: int = 20) -> list[str]:
        """One line per failed page; past `limit`, a last line says how many more and where they are recorded
        (`records`; None: nowhere else, so every failure is listed)."""
        shown = self.failures if records is None or len(self.failures) <= limit else self.failures[:limit]
        lines = [f"  failed: {failure}" for failure in shown]
        if len(shown) < len(self.failures):
            lines.append(f"  and {len(self.failures) - len(shown)} more (see {records})")
        return lines

    def line(self) -> str:
        rate = self.ok / self.seconds if self.seconds else 0.0
        skipped = f", {self.not_documents} files skipped (not documents)" if self.not_documents else ""
        return (f"{self.ok} pages transcribed, {self.skipped} already done, {self.failed} failed{skipped} "
                f"in {self.seconds:.1f}s ({rate:.2f} pages/s)")


class StdoutSink:
    """JSONL on stdout when piped; each page's text under a header on a terminal."""

    existing: list[dict] = []

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

    def document_done(self, done: DocumentDone) -> None:
        pass

    def close(self) -> None:
        pass


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
OUT_HINT = "give a .jsonl file (--out pages.jsonl) or a folder (--out transcripts/; end a dotted folder name with /)"


def open_sink(out: str, docs: list[Input], settings: str):
    """The sink for `--out`: a .jsonl file or a folder; anything else is a usage error, an unwritable one an
    `output_error`, both raised here, before any model loads."""
    from .errors import UsageError

    if out.endswith(JSONL_SUFFIXES):
        return JsonlSink(out)
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return FolderSink(out, docs, settings)
    if os.path.lexists(out) or os.path.splitext(os.path.basename(out))[1]:  # a file, or a name with a suffix
        raise UsageError(f"--out {out} is neither a .jsonl file nor a folder", OUT_HINT)
    return FolderSink(out, docs, settings)


class JsonlSink:
    """Records appended to one .jsonl file, with a lock and crash-safe resume."""

    def __init__(self, path: str):
        try:
            self.lock = OutputLock(path + ".lock").__enter__()
        except OSError as exc:
            raise output_error(path, exc) from exc
        self.records_name = path
        try:
            self.log = RecordLog(path)
        except BaseException:
            self.lock.__exit__()
            raise
        self.existing = self.log.existing

    def write(self, record: dict) -> None:
        self.log.write(record)

    def document_done(self, done: DocumentDone) -> None:
        pass

    def close(self) -> None:
        self.log.close()
        self.lock.__exit__()


class FolderSink(JsonlSink):
    """records.jsonl plus one Markdown file per document, mirroring the input tree."""

    def __init__(self, folder: str, docs: list[Input], settings: str):
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

    def document_done(self, done: DocumentDone) -> None:
        pages = {**self.earlier.get(done.sha256, {}), **self.texts.pop((done.input.path, done.sha256), {})}
        parts = []
        for page in done.pages:
            record = pages.get(page)
            if record and record.get("status") == "ok":
                parts.append(f"<!-- page {page} -->\n\n{record['text'].strip()}\n")
            else:
                err = (record or {}).get("error") or {"code": "missing", "message": "not transcribed"}
                parts.append(f"<!-- page {page}: error [{err['code']}] {err['message']} -->\n")
        atomic_write(self.md_path(done.input.rel), "\n".join(parts))


def failure_record(item: Failure, settings: str) -> PageRecord:
    return PageRecord(path=item.input.path, page=item.page, pages=item.pages, status="error", sha256=item.sha256,
                      settings=settings, error=item.error.to_dict())


def transcribe(engine, docs: list[Input], sink, settings: Settings, open_doc, select_pages, progress=None) -> Summary:
    summary = Summary()
    start = time.perf_counter()
    done = set() if settings.force else done_keys(sink.existing)

    def is_done(sha256: str, page: int) -> bool:
        return (sha256, page, settings.settings) in done

    def on_pages(total: int, skipped: int) -> None:
        summary.total += total
        summary.skipped += skipped
        if progress:
            progress(summary)

    # One batch is built ahead, while the model works on the one before it: a build may start only when the
    # model has started the previous batch (a turn). So a build overlaps that batch's prefill, whose big matrix
    # products lose less to a busy core than the decode's many small steps (bench/transcribe.py), and at most
    # two batches' pixels exist at a time, whatever the page count (bench/memory.py).
    turns, stop = threading.Semaphore(1), threading.Event()

    def build(images):
        while not turns.acquire(timeout=0.1):
            if stop.is_set():
                raise IdeficsError("interrupted", "stopped before this page was prepared")
        try:
            return engine.prepare([([image], settings.prompt) for image in images], collect=True)
        except BaseException:
            turns.release()  # this batch never reaches the model, the next build may start
            raise

    for item in prefetch(docs, open_doc, select_pages, is_done, build, settings.batch_size, stop=stop,
                         on_pages=on_pages):
        if isinstance(item, DocumentDone):
            sink.document_done(item)
            continue
        if isinstance(item, Failure):
            records = [failure_record(item, settings.settings)]
        elif isinstance(item, BlankPage):
            records = [blank_record(item.task, settings)]
        else:
            turns.release()
            records = answer_batch(engine, item, settings)
        for record in records:
            sink.write(record.to_dict())
            if record.status == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{record.path} page {record.page}: {record.error['code']}")
        summary.seconds = time.perf_counter() - start
        if progress:
            progress(summary)
        item = records = None  # this batch's pixels are freed before the next batch is waited for
    summary.seconds = time.perf_counter() - start
    return summary


def answer_batch(engine, batch: Batch, settings: Settings) -> list[PageRecord]:
    """Generate a batch; on out-of-memory fall back to single pages, then to single pages without split."""
    try:
        gens = engine.generate_batch(batch.inputs, settings.max_new_tokens)
    except IdeficsError as err:
        if err.code != "out_of_memory":
            return [error_record(task, err, settings) for task in batch.tasks]
        return [answer_single(engine, task, image, settings) for task, image in zip(batch.tasks, batch.images)]
    n = len(batch.tasks)
    return [ok_record(task, gen, engine.usage(batch.inputs, row), batch.preprocess_s / n, settings, n)
            for row, (task, gen) in enumerate(zip(batch.tasks, gens))]


def answer_single(engine, task, image, settings: Settings) -> PageRecord:
    """One page alone, and if that runs out of memory too, once more without image splitting."""
    err = None
    for split in (None, False) if engine.options.split else (None,):
        try:
            t0 = time.perf_counter()
            inputs = engine.prepare([([image], settings.prompt)], split=split, collect=True)
            preprocess_s = time.perf_counter() - t0
            gen = engine.generate_batch(inputs, settings.max_new_tokens)[0]
            return ok_record(task, gen, engine.usage(inputs), preprocess_s, settings)
        except Exception as exc:  # noqa: BLE001 - recorded per page
            err = classify(exc, task.input.path)
            if err.code != "out_of_memory":
                break
    return error_record(task, err, settings)


def ok_record(task, gen, usage, preprocess_s: float, settings: Settings, batch_size: int = 1) -> PageRecord:
    """A page's record; its `timing` is its share of its batch's time (`batch_size` pages shared one call)."""
    return PageRecord(path=task.input.path, page=task.page, pages=task.pages, status="ok", sha256=task.sha256,
                      settings=settings.settings, text=gen.text, finish_reason=gen.finish_reason,
                      usage={**usage, "completion_tokens": gen.completion_tokens},
                      timing={"preprocess_s": round(preprocess_s, 4), "generate_s": round(gen.total_s / batch_size, 4),
                              "batch_size": batch_size}, warnings=list(task.warnings))


def blank_record(task, settings: Settings) -> PageRecord:
    """A flat-colour page: nothing to read, so "" without asking the model (warning blank_page)."""
    return PageRecord(path=task.input.path, page=task.page, pages=task.pages, status="ok", sha256=task.sha256,
                      settings=settings.settings, text="", finish_reason="stop", warnings=list(task.warnings),
                      usage={"prompt_tokens": 0, "image_tokens": 0, "completion_tokens": 0},
                      timing={"preprocess_s": 0.0, "generate_s": 0.0, "batch_size": 0})


def error_record(task, err: IdeficsError, settings: Settings) -> PageRecord:
    return PageRecord(path=task.input.path, page=task.page, pages=task.pages, status="error", sha256=task.sha256,
                      settings=settings.settings, error=err.to_dict(), warnings=list(task.warnings))
