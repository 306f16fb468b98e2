"""Transcription: one `transcribe` run as a library object (what `idefics transcribe` and `Engine.transcribe` run).

Contract:
- `TranscribeRequest` is a frozen description of a run: inputs (files, folders, globs, `-`), `out` (a `.jsonl`
  file, a folder, or None), the model options, prompt, pages, dpi, password, batch size (None: auto), force,
  shard, engine (`local` or `ray`), schema (`--schema`: a structured.Schema, a dict or a string; its keywords
  are checked when the request is made, its grammar just before the model loads, so a finished rerun still
  imports no torch). Bad values raise `UsageError` when it is made. `settings_hash`, the resume key written
  in every record's `settings` field, is computed here and nowhere else: from everything that changes a
  page's text (model id and revision, quantization, split, render size, prompt, max new tokens, and the
  schema's hash when there is one). `model_prompt` is what the model gets with each page: the prompt, or with
  a schema `structured.with_schema(prompt, schema)`.
- `Transcription(request, engine=None, output=None)` runs it when iterated, yielding each `PageRecord`
  (`path`, `page`, `status`, ...) once it is written to the sink `out` names (`JsonlSink`, `FolderSink`;
  without `out`, stdout through `output`, or nothing for a library caller): the same records, resume and
  files whichever way it runs. Inputs are walked (batch.walk) and filtered by the shard; when no chosen page
  is left for the model, the model is never loaded (no torch import); otherwise `engine` is used, or the
  model is loaded (local: where the batch size is known before the model is, given or the CPU's 8, the first
  batch is rendered and prepared while the weights load), or the Ray engine runs. Afterwards `summary`
  (records.Summary), `errors` (inputs that matched nothing) and `exit_status` (0 all done, 3 partial, 4
  nothing readable) tell how it went; iterating again yields nothing new; `close()` (or a `with` block) ends a
  run left early and closes its output. With an `output` (the CLI), errors, warnings, the loading spinner, the
  progress bar and the summary go to its stderr; without one, the run prints nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

from .errors import ExitStatus, IdeficsError, UsageError
from .model import ModelOptions
from .prompts import TRANSCRIBE_PROMPT
from .records import PageRecord, Summary, settings_hash

ENGINES = ("local", "ray")
RAY_BATCH_SIZE = 4  # pages a model actor answers a call when the batch size is auto


@dataclass(frozen=True)
class TranscribeRequest:
    """What to transcribe, where to, and how (the `idefics transcribe` options)."""

    inputs: tuple[str, ...]
    out: str | None = None
    options: ModelOptions = field(default_factory=ModelOptions)
    prompt: str | None = None  # None: the default transcription prompt
    pages: str | None = None  # a --pages spec (pages.py), None: every page
    dpi: int | None = None  # None: pages rendered to fit the model (documents.DEFAULT_LONGEST_SIDE)
    password: str | None = None
    batch_size: int | str | None = None  # pages a generate call; None or "auto": from the device
    force: bool = False
    shard: str | None = None  # "I/N"
    engine: str = "local"
    ray_address: str | None = None
    schema: object = None  # structured.Schema once made (given as a Schema, a dict or a --schema string)
    settings_hash: str = field(init=False)

    def __post_init__(self):
        from .batch import parse_shard
        from .documents.pages import parse_page_spec

        set_ = partial(object.__setattr__, self)
        one = isinstance(self.inputs, (str, os.PathLike))
        set_("inputs", tuple(os.fspath(p) for p in ((self.inputs,) if one else self.inputs)))
        set_("prompt", self.prompt or TRANSCRIBE_PROMPT)
        set_("engine", getattr(self.engine, "value", self.engine))
        if self.engine not in ENGINES:
            raise UsageError(f"unknown --engine {self.engine!r}", "use local or ray")
        size = self.batch_size
        if size == "auto":
            size = None
        elif isinstance(size, str) and size.isdigit():
            size = int(size)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UsageError(f"bad --batch-size {self.batch_size!r}", "use a positive number or auto")
        set_("batch_size", size)
        parse_page_spec(self.pages)
        parse_shard(self.shard)
        if self.schema is not None:
            from .structured import as_schema

            set_("schema", as_schema(self.schema, grammar_check=False))  # the grammar: check_grammar()
        set_("settings_hash", self._settings_hash())

    def _settings_hash(self) -> str:
        from .documents import DEFAULT_LONGEST_SIDE

        opts = self.options
        extra = {"schema": self.schema.sha256} if self.schema is not None else {}  # no schema: hashes as before
        return settings_hash(model=opts.model, revision=opts.revision, quant=opts.quant, split=opts.split,
                             render=self.dpi or DEFAULT_LONGEST_SIDE, render_unit="dpi" if self.dpi else "longest_side",
                             prompt=self.prompt, max_new_tokens=opts.max_new_tokens, **extra)

    @property
    def model_prompt(self) -> str:
        """What the model is asked with each page: the prompt, plus the schema's text with a schema."""
        if self.schema is None:
            return self.prompt
        from .structured import with_schema

        return with_schema(self.prompt, self.schema)

    def check_grammar(self) -> None:
        """The schema converts to a grammar (llguidance, no torch): a UsageError now, before any model loads."""
        if self.schema is not None:
            from .structured import grammar

            grammar(self.schema.schema)

    @property
    def page_spec(self):
        from .documents.pages import parse_page_spec

        return parse_page_spec(self.pages)

    def select_pages(self, doc) -> list[int]:
        """The chosen pages of an open document (1-based)."""
        return self.page_spec.resolve(doc.page_count)

    def open_document(self, path: str):
        from .documents import open_document

        return open_document(path, password=self.password, dpi=self.dpi)


class Transcription:
    """A run of a `TranscribeRequest`: iterate it for its page records; `summary` and `exit_status` after."""

    def __init__(self, request: TranscribeRequest, engine=None, output=None):
        if engine is not None and request.engine != "local":
            raise UsageError("a loaded engine transcribes locally", "use engine='local', or no loaded engine")
        self.request, self.engine, self.output = request, engine, output
        self.summary = Summary()
        self.errors: list[IdeficsError] = []
        self.exit_status: ExitStatus | None = None
        self._records: Iterator[PageRecord] | None = None

    def __iter__(self) -> Iterator[PageRecord]:
        if self._records is None:
            self._records = self._run()
        return self._records

    def close(self) -> None:
        """Stop a run left before its end: its output is closed (and unlocked) now, not when garbage collected."""
        if self._records is not None:
            self._records.close()

    def __enter__(self) -> Transcription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> ExitStatus:
        """Run to the end (the records go to the sink only); returns the exit status."""
        for _ in self:
            pass
        return self.exit_status

    @property
    def quiet(self) -> bool:
        return self.output is None or self.output.quiet

    def _run(self) -> Iterator[PageRecord]:
        from . import batch as b

        request, output = self.request, self.output
        not_documents: list[str] = []
        docs, self.errors = b.walk(list(request.inputs), not_documents)
        for err in self.errors:
            if output is not None:
                output.error(err)
        shard = b.parse_shard(request.shard)
        if shard:
            docs = [d for d in docs if b.in_shard(d.rel, *shard)]
        self.summary.not_documents = len(not_documents)
        if not docs:
            if not self.errors and output is not None:
                skipped = f" ({len(not_documents)} files skipped: not documents)" if not_documents else ""
                output.warn(f"no documents to transcribe{skipped}")
            self.exit_status = ExitStatus.INPUT if self.errors else ExitStatus.OK
            return
        sink = self._sink(docs)
        with sink:
            yield from self._transcribe(docs, sink)
        if not self.quiet:
            output.console.print(self.summary.line(), markup=False)
            for line in self.summary.failure_lines(sink.records_name):
                output.console.print(line, markup=False, style="red")
        summary = self.summary
        self.exit_status = ExitStatus.INPUT if self.errors and not (summary.ok + summary.skipped) else (
            ExitStatus.PARTIAL if self.errors else summary.exit_status)

    def _sink(self, docs):
        from .sinks import NullSink, StdoutSink, open_sink

        if self.request.out is not None:
            return open_sink(self.request.out, docs, self.request.settings_hash)
        if self.output is not None:
            return StdoutSink(self.output, as_json=not self.output.stdout_tty)
        return NullSink()

    def _transcribe(self, docs, sink) -> Iterator[PageRecord]:
        from . import pipeline
        from .batch import needs_model

        request, output = self.request, self.output
        job = pipeline.Job(request, docs, sink, request.open_document, request.select_pages, self.summary)
        if not needs_model(docs, job.open_doc, job.select_pages, job.is_done):
            # nothing left for the model: no torch import; documents that cannot be read are recorded again
            yield from pipeline.transcribe(None, job)
            if not self.summary.failed and not self.quiet:
                output.console.print("nothing left to do: every chosen page is already done (--force redoes them)",
                                     markup=False)
        elif request.engine == "ray":
            from . import ray_engine

            request.check_grammar()
            from .hub import local_only

            local_only(request.options)  # fail at once here rather than in every actor
            job.request = replace(request, batch_size=request.batch_size or RAY_BATCH_SIZE)
            with Progress(output) as job.progress:
                yield from ray_engine.run(job, request.ray_address)
        else:
            request.check_grammar()
            engine, started = self.engine, None
            try:
                if engine is None:
                    engine, started = self._load(job)
                job.request = replace(job.request, batch_size=job.request.batch_size or engine.auto_batch_size())
                with Progress(output) as job.progress:
                    yield from pipeline.transcribe(engine, job, started)
            finally:
                if started is not None:
                    started.close()

    def _load(self, job):
        """Load the model; where the batch size is known before it (given, or the CPU's), the first batch is
        rendered and prepared while the weights load. Returns (engine, the started prefetcher or None)."""
        from . import pipeline
        from .engine import CPU_BATCH_SIZE, Preparer
        from .model import start_load

        request, output = job.request, self.output
        loading = f"Loading {request.options.model} ({request.options.quant})…"
        with output.status(loading) if output is not None else nullcontext():
            load = start_load(request.options)
            size = request.batch_size or (None if load.device.startswith("cuda") else CPU_BATCH_SIZE)
            started = None
            if size:
                job.request = replace(request, batch_size=size)
                started = pipeline.prefetcher(Preparer(load.processor, request.options, load.device), job).start()
            try:
                return load.finish(), started
            except BaseException:
                if started is not None:
                    started.close()
                raise


class Progress:
    """A Rich progress bar on a terminal's stderr (pages done/total, pages/s, ETA, failures); else nothing."""

    def __init__(self, output):
        self.output = output
        self.bar = None

    def __enter__(self):
        if self.output is None or self.output.quiet or not self.output.stderr_tty:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("transcribing"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]:.2f} pages/s"), TimeRemainingColumn(),
                       TextColumn("[red]{task.fields[failed]} failed"), console=self.output.console)
        self.bar.start()
        self.task = self.bar.add_task("pages", total=None, rate=0.0, failed=0)
        return self.update

    def update(self, summary: Summary) -> None:
        rate = summary.ok / summary.seconds if summary.seconds else 0.0
        self.bar.update(self.task, total=summary.total, completed=summary.ok + summary.skipped + summary.failed,
                        rate=rate, failed=summary.failed)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
