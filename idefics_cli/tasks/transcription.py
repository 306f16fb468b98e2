"""Transcription: one `transcribe` run as a library object (what `idefics transcribe` and `Model.transcribe` run).

Contract: iterating `Transcription(request, engine=None, output=None)` runs it, yielding each `PageRecord` once
written to the sink (`request.out`, else stdout through `output`, else none). No model loads when no chosen page is
left; else `engine`, a loaded model or the Ray engine runs. Then `summary`, `errors` and `exit_status` tell how it
went; `close()` (or `with`) ends a run left early. With an `output`, messages and progress go to its stderr.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import replace

from ..errors import ExitStatus, IdeficsError, UsageError
from . import pipeline
from .batch import in_shard, needs_model, parse_shard, walk
from .pipeline import TranscribeRequest  # noqa: F401 - re-exported: what a run is made of
from .records import DOCTAGS_HINT, PageRecord, Summary, docling_available, error_record
from .writers import NullSink, StdoutSink, open_sink

RAY_BATCH_SIZE = 4  # pages a model actor answers a call when the batch size is auto


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
        request, output = self.request, self.output
        not_documents: list[str] = []
        docs, self.errors = walk(list(request.inputs), not_documents)
        for err in self.errors if output is not None else ():
            output.error(err)
        shard = parse_shard(request.shard)
        if shard:
            docs = [d for d in docs if in_shard(d.rel, *shard)]
        self.summary.not_documents = len(not_documents)
        if not docs and not self.errors:
            if output is not None:
                skipped = f" ({len(not_documents)} files skipped: not documents)" if not_documents else ""
                output.warn(f"no documents to transcribe{skipped}")
            self.exit_status = ExitStatus.OK
            return
        with self._sink(docs) as sink:
            yield from self._transcribe(docs, sink)
        if not self.quiet:
            output.console.print(self.summary.line(), markup=False)
            for line in self.summary.failure_lines(sink.records_name):
                output.console.print(line, markup=False, style="red")
        self.exit_status = self.summary.exit_status

    def _sink(self, docs):
        if self.request.out is not None:
            return open_sink(self.request.out, docs, self.request.settings_hash)
        if self.output is not None:
            return StdoutSink(self.output, as_json=not self.output.stdout_tty)
        return NullSink()

    def _transcribe(self, docs, sink) -> Iterator[PageRecord]:
        request, output = self.request, self.output
        if request.doctags and output is not None and not docling_available():
            output.warn(DOCTAGS_HINT)
        job = pipeline.TranscribeJob(request, docs, sink, request.open_document, request.select_pages, self.summary)
        for err in self.errors:  # an input that matched nothing has its error record too (page 0)
            yield job.emit(error_record(err.path, err, request.settings_hash))
        if not needs_model(docs, job.open_doc, job.select_pages, job.is_done):
            # nothing left for the model: no torch import; documents that cannot be read are recorded again
            yield from pipeline.transcribe(None, job)
            if not self.summary.failed and not self.quiet:
                output.console.print("nothing left to do: every chosen page is already done (--force redoes them)",
                                     markup=False)
            return
        request.check_grammar()
        with ExitStack() as stack:
            if request.engine == "ray":
                from ..runtime.model import check_model
                from . import ray_engine

                check_model(request.options)  # fail at once here rather than in every actor
                job.request = replace(request, batch_size=request.batch_size or RAY_BATCH_SIZE)
                records = ray_engine.run_on_ray(job, request.ray_address)
            else:
                engine, started = (self.engine, None) if self.engine is not None else self._load(job, stack)
                fits(engine, request)
                job.request = replace(job.request, batch_size=job.request.batch_size or engine.auto_batch_size())
                records = pipeline.transcribe(engine, job, started)
            with progress(output) as job.progress:
                yield from records

    def _load(self, job, stack: ExitStack):
        """(engine, the started prefetcher or None, closed by `stack`): with a batch size known before the model
        (given, or the CPU's), the first batch is prepared while the weights load."""
        from ..runtime.engine import CPU_BATCH_SIZE, Preparer
        from ..runtime.model import start_load

        request, output, started = job.request, self.output, None
        loading = f"Loading {request.options.model} ({request.options.quant})…"
        with output.status(loading) if output is not None else nullcontext():
            load = start_load(request.options)
            size = request.batch_size or (None if load.device.startswith("cuda") else CPU_BATCH_SIZE)
            if size:
                job.request = replace(request, batch_size=size)
                preparer = Preparer(load.processor, request.options, load.device)
                started = stack.enter_context(closing(pipeline.prefetcher(preparer, job).start()))
            return load.finish(), started


def fits(engine, request) -> None:
    """One page, the prompt (its schema too) and --max-new-tokens fit the model's context, or a UsageError now, as
    `ask` refuses (a server's engine as far as its model card tells; the rest is refused page by page)."""
    try:
        engine.check_context(1, request.model_prompt, request.options.max_new_tokens)
    except UsageError as err:
        raise UsageError(err.message, "shorten --prompt or --schema, or lower --max-new-tokens") from None


@contextmanager
def progress(output):
    """A Rich progress bar on a terminal's stderr (pages done/total, pages/s, ETA, failures): yields its update
    function, else None."""
    if output is None or output.quiet or not output.stderr_tty:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("transcribing"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.2f} pages/s"), TimeRemainingColumn(),
                   TextColumn("[red]{task.fields[failed]} failed"), console=output.console)
    task = bar.add_task("pages", total=None, rate=0.0, failed=0)

    def update(summary: Summary) -> None:
        bar.update(task, total=summary.total, completed=summary.ok + summary.skipped + summary.failed,
                   rate=summary.ok / summary.seconds if summary.seconds else 0.0, failed=summary.failed)

    with bar:
        yield update
