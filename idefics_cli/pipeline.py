"""Transcription pipeline, the local engine: pages in, page records out, through a sink that loses nothing.

Contract: a `Job` is one run's work: its request (transcription.py; batch size resolved), documents, sink,
and `Summary`. `Job.emit(record)` writes a finished record to the sink at once and counts it (both engines
use it, ray_engine.py too). `transcribe(engine, job)` walks the documents' chosen pages through the
prefetcher (prefetch.py: the one owner of this path's threads), answers them in batches (pages of one size
where possible; the same answers as one page at a time except where float rounding decides a near-tie,
README), and yields each `PageRecord` once it is written. The next batch is prepared (`Engine.prepare`)
while the model works on the current one, never further ahead, so at most two batches' pixels exist at
once, whatever the page count; the vision tower encodes them in same-shape chunks (vision.py). A failed
document or page becomes an error record and the run goes on; a blank page (one flat colour) is recorded
as "" with the warning `blank_page`, without the model; a batch that runs out of memory is retried one
page at a time, then that page without image splitting, before `out_of_memory` is recorded; a `model_error` (a
server that went away, client.py) ends the run, the records written so far kept for a rerun. With
`engine=None` (nothing is left for the model) only documents that cannot be read are recorded again.
With a schema (`request.schema`), every generate call gets its own grammar processor (structured.py: one
grammar state per row, the grammar compiled once per process) and the pages are asked `request.model_prompt`;
`ok_record` reads each answer back (`data`, or an error record `schema_truncated` / `schema_mismatch`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .batch import Batch, BlankPage, DocumentDone, Failure, Input, done_keys
from .errors import IdeficsError, classify
from .prefetch import Prefetcher
from .records import PageRecord, Summary, blank_record, error_record, ok_record, task_error

if TYPE_CHECKING:
    from .sinks import Sink
    from .transcription import TranscribeRequest


@dataclass
class Job:
    """One run's work: the request, its documents and sink, and the summary its records add up to."""

    request: TranscribeRequest
    docs: list[Input]
    sink: Sink
    open_doc: Callable
    select_pages: Callable
    summary: Summary = field(default_factory=Summary)
    progress: Callable[[Summary], None] | None = None  # called with the summary after every change
    done: set = field(init=False)
    start: float = field(init=False)

    def __post_init__(self):
        self.done = set() if self.request.force else done_keys(self.sink.existing)
        self.begin()

    def begin(self) -> None:
        """The run's clock starts (once the model is loaded): `summary.seconds` counts from here."""
        self.start = time.perf_counter()

    @property
    def settings_hash(self) -> str:
        """The settings hash of this run's records (their resume key, with the file's sha256 and the page)."""
        return self.request.settings_hash

    def is_done(self, sha256: str, page: int) -> bool:
        return (sha256, page, self.settings_hash) in self.done

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

    def tick(self) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        if self.progress:
            self.progress(self.summary)


def failure_record(item: Failure, settings: str) -> PageRecord:
    return error_record(item.input.path, item.error, settings, item.page, item.pages, item.sha256)


def prefetcher(preparer, job: Job) -> Prefetcher:
    """The job's prefetcher: its batches' inputs prepared by `preparer` (the engine, or engine.Preparer: the
    processor alone while the weights load, when the batch size is known before the model is)."""
    request = job.request

    def build(images):
        return preparer.prepare([([image], request.model_prompt) for image in images], collect=True)

    return Prefetcher(job.docs, job.open_doc, job.select_pages, job.is_done, build, request.batch_size or 1,
                      on_pages=job.pages)


def transcribe(engine, job: Job, started: Prefetcher | None = None) -> Iterator[PageRecord]:
    """The job's records, each yielded once written; `engine=None` when no chosen page needs the model.
    `started`: the job's prefetcher, started while the model loaded (else one is made here)."""
    request = job.request
    job.begin()
    for item in started or prefetcher(engine, job):
        if isinstance(item, DocumentDone):
            job.sink.document_done(item)
            continue
        if isinstance(item, Failure):
            records = [failure_record(item, job.settings_hash)]
        elif isinstance(item, BlankPage):
            records = [blank_record(item.task, job.settings_hash, request.schema)]
        else:
            records = answer_batch(engine, item, request)
        item = None  # this batch's pixels are freed before the next batch is waited for
        for record in records:
            yield job.emit(record)
        records = None
    job.tick()


def generate(engine, inputs, request: TranscribeRequest):
    """`engine.generate_batch` for the request; with a schema, a new grammar processor for this call."""
    if request.schema is None:
        return engine.generate_batch(inputs, request.options.max_new_tokens)
    return engine.generate_batch(inputs, request.options.max_new_tokens,
                                 logits_processor=engine.grammar_processors(request.schema))


def answer_batch(engine, batch: Batch, request: TranscribeRequest) -> list[PageRecord]:
    """Generate a batch; on out-of-memory fall back to single pages, then to single pages without split."""
    settings = request.settings_hash
    try:
        gens = generate(engine, batch.inputs, request)
    except IdeficsError as err:
        if err.code == "model_error":  # a server that went away (client.py): stop; a rerun resumes
            raise
        if err.code != "out_of_memory":
            return [task_error(task, err, settings) for task in batch.tasks]
        return [answer_single(engine, task, image, request) for task, image in zip(batch.tasks, batch.images)]
    n = len(batch.tasks)
    return [ok_record(task, gen, engine.usage(batch.inputs, row), batch.preprocess_s / n, settings, n, request.schema)
            for row, (task, gen) in enumerate(zip(batch.tasks, gens))]


def answer_single(engine, task, image, request: TranscribeRequest) -> PageRecord:
    """One page alone, and if that runs out of memory too, once more without image splitting."""
    err = None
    for split in (None, False) if engine.options.split else (None,):
        try:
            t0 = time.perf_counter()
            inputs = engine.prepare([([image], request.model_prompt)], split=split, collect=True)
            preprocess_s = time.perf_counter() - t0
            gen = generate(engine, inputs, request)[0]
            return ok_record(task, gen, engine.usage(inputs), preprocess_s, request.settings_hash,
                             schema=request.schema)
        except Exception as exc:  # noqa: BLE001 - recorded per page
            err = classify(exc, task.input.path)
            if err.code != "out_of_memory":
                break
    return task_error(task, err, request.settings_hash)
