"""Transcription pipeline, the local engine: pages in, page records out, through a sink that loses nothing.

Contract: `TranscribeRequest` (frozen; bad values: `UsageError`) holds the options and `settings_hash`, the resume
key. A `TranscribeJob` is one run's work; `emit(record)` writes and counts a record. `transcribe(engine, job)` feeds
the prefetcher's pages to the engine's decode loop and yields each record once written, in page order. Failed pages
become error records; an out-of-memory page is retried alone, then unsplit; a `model_error` ends the run (but a
`StalledAnswer`, one answer a server stopped sending, is that page's error record).
"""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial

from ..errors import IdeficsError, StalledAnswer, UsageError, classify
from ..interface import DOCLING_PROMPT, DPI_RANGE, MAX_NEW_TOKENS, TRANSCRIBE_PROMPT, ModelOptions, check_option
from .batch import Batch, BlankPage, DocumentDone, Failure, Input, Prefetcher, parse_shard
from .records import PageRecord, Summary, blank_record, error_record, ok_record, settings_hash, task_error, trusted
from .selection import prompt_for
from .writers import Sink

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class TranscribeRequest:
    """What to transcribe, where to, and how (the `idefics transcribe` options)."""

    inputs: tuple[str, ...]
    out: str | None = None
    options: ModelOptions = field(default_factory=ModelOptions)
    prompt: str | None = None  # None: the default transcription prompt
    pages: str | None = None  # a --pages spec (pages.py), None: every page
    dpi: int | None = None  # None: pages rendered to fit the model (longest_side)
    longest_side: int | None = None  # the model's render size (families.render_side); None: the documents' default
    doctags: bool = False  # a document model (families.doctags): its own prompt, and Markdown added to records
    password: str | None = None
    batch_size: int | str | None = None  # pages a generate call; None or "auto": from the device
    force: bool = False
    shard: str | None = None  # "I/N"
    engine: str = "local"
    ray_address: str | None = None
    schema: object = None  # structured.Schema once made (given as a Schema, a dict or a --schema string)
    min_confidence: float | None = None  # pages under it warn low_confidence (records.ok_record); not hashed
    settings_hash: str = field(init=False)

    def __post_init__(self):
        from ..documents import document_paths
        from ..documents.pages import parse_page_spec

        set_ = partial(object.__setattr__, self)
        set_("inputs", tuple(document_paths(self.inputs)))
        if not (self.out is None or isinstance(self.out, (str, os.PathLike))):
            raise UsageError(f"out must be a file or folder path, not {type(self.out).__name__}")
        set_("out", None if self.out is None else os.fspath(self.out))
        if not (self.prompt is None or isinstance(self.prompt, str)):
            raise UsageError(f"the prompt must be a string, not {type(self.prompt).__name__}")
        if not isinstance(self.force, bool):
            raise UsageError(f"force must be True or False, not {self.force!r}")
        if not (self.password is None or isinstance(self.password, str)):
            raise UsageError(f"the password must be a string, not {type(self.password).__name__}")
        check_option("dpi", self.dpi, *DPI_RANGE)
        check_option("max_new_tokens", self.options.max_new_tokens, 1, MAX_NEW_TOKENS)
        set_("prompt", self.prompt or (DOCLING_PROMPT if self.doctags else TRANSCRIBE_PROMPT))
        set_("engine", getattr(self.engine, "value", self.engine))
        if self.engine not in ENGINES:
            raise UsageError(f"unknown --engine {self.engine!r}", "use local or ray")
        size = None if self.batch_size == "auto" else self.batch_size
        size = int(size) if isinstance(size, str) and size.isdigit() else size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UsageError(f"bad --batch-size {self.batch_size!r}", "use a positive number or auto")
        set_("batch_size", size)
        parse_page_spec(self.pages)
        parse_shard(self.shard)
        low = self.min_confidence
        if low is not None and (isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 <= low <= 1):
            raise UsageError(f"bad --min-confidence {low!r}", "a probability from 0 to 1, e.g. 0.5")
        if self.schema is not None:
            from ..structured import as_schema

            set_("schema", as_schema(self.schema, grammar_check=False))  # the grammar: check_grammar()
        set_("settings_hash", self._settings_hash())

    def _settings_hash(self) -> str:
        from ..documents import DEFAULT_LONGEST_SIDE

        opts = self.options
        extra = {"schema": self.schema.sha256} if self.schema is not None else {}  # no schema: hashes as before
        return settings_hash(model=opts.model, revision=opts.revision, quant=opts.quant, split=opts.split,
                             render=self.dpi or self.longest_side or DEFAULT_LONGEST_SIDE,
                             render_unit="dpi" if self.dpi else "longest_side",
                             prompt=self.prompt, max_new_tokens=opts.max_new_tokens, **extra)

    @property
    def model_prompt(self) -> str:
        """What the model is asked with each page: the prompt, plus the schema's text with a schema."""
        return prompt_for(self.prompt, self.schema)

    def check_grammar(self) -> None:
        """The schema converts to a grammar (llguidance, no torch): a UsageError now, before any model loads."""
        if self.schema is not None:
            from ..structured import grammar

            grammar(self.schema.schema)

    def select_pages(self, doc) -> list[int]:
        """The chosen pages of an open document (1-based)."""
        from ..documents.pages import parse_page_spec

        return parse_page_spec(self.pages).resolve(doc.page_count)

    def open_document(self, path: str):
        from ..documents import open_document

        return open_document(path, password=self.password, dpi=self.dpi, longest_side=self.longest_side)


@dataclass
class TranscribeJob:
    """One run's work: the request, its documents and sink, and the summary its records add up to."""

    request: TranscribeRequest
    docs: list[Input]
    sink: Sink
    open_doc: Callable
    select_pages: Callable
    summary: Summary = field(default_factory=Summary)
    progress: Callable[[Summary], None] | None = None  # called with the summary after every change
    done: set = field(init=False)  # (sha256, page, settings) of the pages an earlier run answered
    start: float = field(init=False)

    def __post_init__(self):
        existing = [] if self.request.force else self.sink.existing
        earlier = [r for r in existing if r.get("status") == "ok" and trusted(r)]  # a hand-edited line may not be
        self.earlier = {(r.get("sha256"), r.get("page"), r.get("settings")): r for r in earlier}
        self.done = set(self.earlier)
        self.recorded = {(r.get("path"), r.get("page")) for r in earlier}
        self.begin()

    def begin(self) -> None:
        """Start the run's clock (once the model is loaded)."""
        self.start = time.perf_counter()

    def is_done(self, sha256: str, page: int) -> bool:
        return (sha256, page, self.request.settings_hash) in self.done

    def pages(self, total: int, skipped: int) -> None:
        """A document's chosen pages were counted: `total`, of which `skipped` are already done."""
        self.summary.total += total
        self.summary.skipped += skipped
        self.tick()

    def emit(self, record: PageRecord) -> PageRecord:
        """Write a finished record at once and count it."""
        self.sink.write(record.to_dict())
        self.summary.add(record)
        self.tick()
        return record

    def document_done(self, done: DocumentDone) -> None:
        """All of a document's pages are in. Pages skipped because an earlier run answered the same bytes under
        another path get that record under this path first, so that every input has its records."""
        for page in done.pages:
            record = self.earlier.get((done.sha256, page, self.request.settings_hash))
            if record is not None and (done.input.path, page) not in self.recorded:
                self.recorded.add((done.input.path, page))
                self.sink.write({**record, "path": done.input.path})
        self.sink.document_done(done)

    def tick(self) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        if self.progress:
            self.progress(self.summary)


def page_builder(preparer, request: TranscribeRequest):
    """`build(images)` for batch.build_batch: the inputs of one page an image, prepared by `preparer` (the engine,
    or engine.Preparer while it loads)."""
    prompt = request.model_prompt
    return lambda images: preparer.prepare([([image], prompt) for image in images], collect=True)


def prefetcher(preparer, job: TranscribeJob) -> Prefetcher:
    """The job's prefetcher, its batches prepared by `preparer`."""
    return Prefetcher(job.docs, job.open_doc, job.select_pages, job.is_done, page_builder(preparer, job.request),
                      job.request.batch_size or 1, on_pages=job.pages)


@dataclass
class _Slot:
    """A place in the run's record order: a page waiting for its answer, or an item already settled."""

    item: object
    row: int = 0
    result: object = None  # the page's Generation or IdeficsError once answered

    @property
    def ready(self) -> bool:
        return not isinstance(self.item, Batch) or self.result is not None

    def settle(self, result) -> None:
        """The page's answer is in; its batch (and pixels) is let go unless it must be retried alone."""
        self.result = result
        if not (isinstance(result, IdeficsError) and result.code == "out_of_memory"):
            batch = self.item
            self.item = batch.tasks[self.row], len(batch.tasks), batch.preprocess_s


def transcribe(engine, job: TranscribeJob, started: Prefetcher | None = None) -> Iterator[PageRecord]:
    """The job's records in page order, each yielded once written; `engine=None` when no page needs the model.
    `started`: the job's prefetcher, started while the model loaded (else one is made here)."""
    request = job.request
    job.begin()
    items = started or prefetcher(engine, job)
    waiting: dict[int, _Slot] = {}  # by `seq`: the order the prefetcher read them (else the order they came)
    arrival, turn = itertools.count(), 0  # turn: the next seq to write

    def place(slot: _Slot, seq: int | None) -> None:
        waiting[next(arrival) if seq is None else seq] = slot

    def feed():
        read = iter(items)  # a Prefetcher's generator (its thread stopped as it closes), or a list's iterator
        try:
            for item in read:
                if not isinstance(item, Batch):
                    place(_Slot(item), item.seq)
                    continue
                for row in range(len(item.tasks)):
                    slot = _Slot(item, row)
                    place(slot, item.tasks[row].seq)
                    yield slot, item.inputs, row
        finally:
            getattr(read, "close", lambda: None)()

    def flush(final: bool = False) -> Iterator[PageRecord]:
        nonlocal turn
        while waiting:
            seq = turn if turn in waiting or not final else min(waiting)
            if seq not in waiting or not waiting[seq].ready:
                return
            turn = seq + 1
            if (record := _record(engine, waiting.pop(seq), request, job)) is not None:
                yield job.emit(record)

    # closed here, on an error too (not when garbage collected, where a Ctrl-C while the prefetcher stops is lost)
    with closing(feed()) as rows:
        if engine is None:
            for _ in rows:
                raise RuntimeError("a page needs the model, but no engine was given")
        else:
            with closing(engine.generate_rows(rows, request.options.max_new_tokens, request.schema,
                                              request.batch_size or 1)) as answers:
                for slot, result in answers:
                    slot.settle(result)
                    yield from flush()
    yield from flush(final=True)
    job.tick()


def _record(engine, slot: _Slot, request: TranscribeRequest, job: TranscribeJob) -> PageRecord | None:
    item, settings, result = slot.item, request.settings_hash, slot.result
    if isinstance(item, DocumentDone):
        job.document_done(item)
        return None
    if isinstance(item, Failure):
        return error_record(item.input.path, item.error, settings, item.page, item.pages, item.sha256)
    if isinstance(item, BlankPage):
        return blank_record(item.task, settings, request.schema)
    if isinstance(item, Batch):  # out of memory among other rows: this page alone, then without splitting
        return answer_single(engine, item.tasks[slot.row], item.images[slot.row], request)
    task, n, preprocess_s = item
    if isinstance(result, IdeficsError) and result.code == "model_error" and not isinstance(result, StalledAnswer):
        raise result  # a server that went away (client.py): stop; a rerun resumes
    if isinstance(result, IdeficsError):
        return task_error(task, result, settings)
    return ok_record(task, result, preprocess_s / n, settings, n, request.schema,
                     request.min_confidence, request.doctags, request.options.max_new_tokens)


def answer_single(engine, task, image, request: TranscribeRequest) -> PageRecord:
    """One page alone, and if that runs out of memory too, once more without image splitting."""
    err = None
    for split in (None, False) if engine.options.split else (None,):
        try:
            t0 = time.perf_counter()
            inputs = engine.prepare([([image], request.model_prompt)], split=split, collect=True)
            preprocess_s = time.perf_counter() - t0
            gen = engine.generate_batch(inputs, request.options.max_new_tokens, schema=request.schema)[0]
            return ok_record(task, gen, preprocess_s, request.settings_hash, 1, request.schema,
                             request.min_confidence, request.doctags, request.options.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - recorded per page
            err = classify(exc, task.input.path)
            if err.code != "out_of_memory":
                break
    return task_error(task, err, request.settings_hash)
