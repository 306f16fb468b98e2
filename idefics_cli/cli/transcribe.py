"""`idefics transcribe PATH...`: files, folders and globs to page records; batched and resumable.

Contract: parsing only; the run is a `TranscribeRequest` run by `Transcription` (transcription.py): inputs
are walked, filtered by `--shard`, and every chosen page is transcribed once per settings: with `--out` the
records file (or folder) is resumed, `--force` redoes pages. When no chosen page is left for the model (a
rerun of a finished job), the model is never loaded (no torch import). Without `--out`, JSONL goes to
stdout when it is piped and readable text when it is a terminal. Progress and the final summary go to
stderr. Exit 0 all done, 3 partial, 4 nothing readable. `--schema` (checked when the request is made, before
anything is walked) constrains every page's answer to a JSON Schema: records get `data`. With `--server URL` a
running `idefics serve` answers (client.py; pages rendered here, a batch sent at once): the same records and
settings hash as a local run of the server's model, so either resumes the other.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ..prompts import TRANSCRIBE_PROMPT
from ..runtime.families import doctags, render_side
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
  idefics transcribe invoices/ --schema invoice.schema.json --out invoices.jsonl
"""


@o.model_params(1024)
def transcribe_command(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", show_default=False,
                                               help="Files, folders (recursive) or quoted globs; - for stdin.")],
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="PATH",
                                            help="A .jsonl file, or a folder (one .md per document + "
                                                 "records.jsonl).")] = None,
    prompt: Annotated[str | None, typer.Option(metavar="TEXT", help="Instruction sent with each page.",
                                               show_default=TRANSCRIBE_PROMPT)] = None,
    batch_size: Annotated[str, typer.Option(metavar="N", help="Pages decoding together: N, or auto (from free GPU "
                                                              "memory; 8 on the CPU; 4 per Ray actor).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Redo pages that are already done.")] = False,
    shard: Annotated[str | None, typer.Option(metavar="I/N",
                                              help="Only the documents of shard I (0-based) of N.")] = None,
    engine: Annotated[EngineName, typer.Option(help="local, or the same pipeline on Ray Data (pip install "
                                                    "'idefics-cli[ray]').")] = "local",
    ray_address: Annotated[str | None, typer.Option(metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, "
                                                                         "else a local Ray).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    schema: o.SchemaOpt = None,
    min_confidence: Annotated[float | None, typer.Option(
        "--min-confidence", help="Warn low_confidence on pages whose lowest field (or, without --schema, token) "
                                 "probability is under this.")] = None,
    pages: o.PagesOpt = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> None:
    """Transcribe every page of files, folders or globs. JSONL records, and Markdown with --out DIR."""
    from ..output import Output
    from . import one_malloc_arena

    one_malloc_arena()  # before any thread starts: flat peak memory over long runs
    output = Output(quiet=quiet)
    o.run_and_exit(lambda: _transcribe(output, paths, out, prompt, batch_size, force, shard, engine, pages,
                   dpi, password, opts, ray_address, schema, server, api_key, min_confidence), output)


def _transcribe(output, paths, out, prompt, batch_size, force, shard, engine_name, pages, dpi, password, opts,
                ray_address=None, schema=None, server=None, api_key=None, min_confidence=None):
    from ..tasks.transcription import TranscribeRequest, Transcription

    engine = None
    if server:  # a running server's model: its settings make the records' settings hash (resume)
        if engine_name != "local":
            from ..errors import UsageError

            raise UsageError("--server and --engine ray cannot be combined", "drop one of them")
        engine = o.engine(opts, server, api_key, output)
        opts = engine.options
    request = TranscribeRequest(tuple(paths), out, opts, prompt=prompt, pages=pages, dpi=dpi, password=password,
                                batch_size=batch_size, force=force, shard=shard, engine=engine_name,
                                ray_address=ray_address, schema=schema, min_confidence=min_confidence,
                                longest_side=None if server else render_side(opts),
                                doctags=not server and doctags(opts))
    return Transcription(request, engine=engine, output=output).run()
