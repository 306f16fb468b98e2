"""`idefics transcribe PATH...`: files, folders and globs to page records; batched and resumable.

Contract: inputs are walked (batch.walk), filtered by `--shard`, and every chosen page is transcribed
once per settings: with `--out` the records file (or folder) is resumed, `--force` redoes pages. When no
chosen page is left for the model (a rerun of a finished job), the model is never loaded (no torch import).
Without `--out`, JSONL goes to stdout when it is piped and readable text when it is a terminal.
Progress and the final summary go to stderr. Exit 0 all done, 3 partial, 4 nothing readable.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ..prompts import TRANSCRIBE_PROMPT
from . import options as o


class EngineName(str, enum.Enum):
    local = "local"
    ray = "ray"


EPILOG = """Examples:

\b
  idefics transcribe scans/ --out transcripts/          # one .md per document + records.jsonl
  idefics transcribe 'archive/**/*.pdf' --out pages.jsonl
  idefics transcribe invoices/ | jq -r 'select(.status=="ok") | .text'
  idefics transcribe scans/ --out transcripts/          # run again: picks up where it stopped
  idefics transcribe big/ --out part3.jsonl --shard 3/8  # one job of an array of 8
"""


def transcribe(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", show_default=False,
                                               help="Files, folders (recursive) or quoted globs; - for stdin.")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="A .jsonl file, or a folder (one .md per "
                                                                 "document + records.jsonl).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Instruction sent with each page.",
                                               show_default=TRANSCRIBE_PROMPT)] = None,
    batch_size: Annotated[str, typer.Option(help="Pages per generate call: N or auto.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Redo pages that are already done.")] = False,
    shard: Annotated[str | None, typer.Option(help="I/N: only the documents of shard I (0-based) of N.")] = None,
    engine: Annotated[EngineName, typer.Option(help="ray needs pip install 'idefics-cli[ray]'.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: RAY_ADDRESS, else a "
                                                         "local Ray).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    pages: o.Pages = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    model: o.Model = o.DEFAULT_MODEL,
    revision: o.Revision = None,
    quant: o.QuantOpt = o.Quant.bit4,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.Device = "auto",
    offline: o.Offline = False,
    split: o.Split = True,
    max_new_tokens: o.max_new_tokens_option(1024) = 1024,
) -> None:
    """Transcribe every page of files, folders or globs to JSONL records (and Markdown with --out DIR)."""
    from ..output import Output
    from . import one_malloc_arena

    one_malloc_arena()  # before any thread starts: flat peak memory over long runs (bench/memory.py)
    output = Output(quiet=quiet)
    opts = o.model_options(model, revision, quant, dtype, device, offline, split, max_new_tokens)
    o.run_and_exit(lambda: _transcribe(output, paths, out, prompt, batch_size, force, shard, engine, pages,
                   dpi, password, opts, ray_address), output)


def _transcribe(output, paths, out, prompt, batch_size, force, shard, engine_name, pages, dpi, password, opts,
                ray_address=None):
    from .. import batch as b
    from ..documents import DEFAULT_LONGEST_SIDE, open_document
    from ..errors import ExitStatus, UsageError
    from ..pages import parse_page_spec
    from ..pipeline import Settings, StdoutSink, open_sink, transcribe
    from ..prompts import TRANSCRIBE_PROMPT
    from ..records import settings_hash

    engine_name = getattr(engine_name, "value", engine_name)
    if engine_name not in ("local", "ray"):
        raise UsageError(f"unknown --engine {engine_name!r}", "use local or ray")
    if batch_size != "auto" and (not batch_size.isdigit() or int(batch_size) < 1):
        raise UsageError(f"bad --batch-size {batch_size!r}", "use a positive number or auto")
    spec = parse_page_spec(pages)
    shard_spec = b.parse_shard(shard)
    prompt = prompt or TRANSCRIBE_PROMPT
    not_documents: list[str] = []
    docs, missing = b.walk(paths, not_documents)
    for err in missing:
        output.error(err)
    if shard_spec:
        docs = [d for d in docs if b.in_shard(d.rel, *shard_spec)]
    if not docs:
        if missing:
            return ExitStatus.INPUT
        skipped = f" ({len(not_documents)} files skipped: not documents)" if not_documents else ""
        output.warn(f"no documents to transcribe{skipped}")
        return ExitStatus.OK

    settings = Settings(prompt=prompt, max_new_tokens=opts.max_new_tokens, batch_size=1, force=force,
                        settings=settings_hash(model=opts.model, revision=opts.revision, quant=opts.quant,
                                               split=opts.split, render=dpi or DEFAULT_LONGEST_SIDE,
                                               render_unit="dpi" if dpi else "longest_side", prompt=prompt,
                                               max_new_tokens=opts.max_new_tokens))
    sink = StdoutSink(output, as_json=not output.stdout_tty) if out is None else open_sink(out, docs, settings.settings)
    try:
        from functools import partial

        open_doc = partial(open_document, password=password, dpi=dpi)
        select_pages = partial(_select, spec)
        done = set() if force else b.done_keys(sink.existing)
        if not b.needs_model(docs, open_doc, select_pages, lambda sha256, page: (sha256, page, settings.settings)
                             in done):
            # nothing left for the model: no torch import; documents that cannot be read are recorded again
            summary = transcribe(None, docs, sink, settings, open_doc, select_pages)
            if not summary.failed and not output.quiet:
                output.console.print("nothing left to do: every chosen page is already done (--force redoes them)",
                                     markup=False)
        elif engine_name == "ray":
            from .. import ray_engine
            from ..hub import local_only

            local_only(opts)  # fail at once here rather than in every actor

            settings.batch_size = 4 if batch_size == "auto" else int(batch_size)
            with _progress(output) as progress:
                summary = ray_engine.run(opts, docs, sink, settings, open_doc, select_pages, ray_address, progress)
        else:
            from ..model import load

            with output.status(f"Loading {opts.model} ({opts.quant})…"):
                engine = load(opts)
            settings.batch_size = engine.auto_batch_size() if batch_size == "auto" else int(batch_size)
            with _progress(output) as progress:
                summary = transcribe(engine, docs, sink, settings, open_doc, select_pages, progress=progress)
    finally:
        sink.close()
    summary.not_documents = len(not_documents)
    if not output.quiet:
        output.console.print(summary.line(), markup=False)
        for line in summary.failure_lines(getattr(sink, "records_name", None)):
            output.console.print(line, markup=False, style="red")
    return ExitStatus.INPUT if missing and not (summary.ok + summary.skipped) else (
        ExitStatus.PARTIAL if missing else summary.exit_status)


def _select(spec, doc) -> list[int]:
    return spec.resolve(doc.page_count)


class _progress:
    """A Rich progress bar on a terminal's stderr (pages done/total, pages/s, ETA, failures)."""

    def __init__(self, output):
        self.output = output
        self.bar = None

    def __enter__(self):
        if self.output.quiet or not self.output.stderr_tty:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("transcribing"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]:.2f} pages/s"), TimeRemainingColumn(),
                            TextColumn("[red]{task.fields[failed]} failed"), console=self.output.console)
        self.bar.start()
        self.task = self.bar.add_task("pages", total=None, rate=0.0, failed=0)
        return self.update

    def update(self, summary) -> None:
        rate = summary.ok / summary.seconds if summary.seconds else 0.0
        self.bar.update(self.task, total=summary.total, completed=summary.ok + summary.skipped + summary.failed,
                        rate=rate, failed=summary.failed)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
