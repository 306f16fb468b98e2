"""`idefics transcribe PATH...`: files, folders and globs to page records; batched and resumable.

Contract: parsing only; `Transcription` (transcription.py; docs/transcribe.md) runs the request. Exit 0 all
done, 3 partial, 4 nothing readable.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ..errors import UsageError
from ..interface import TRANSCRIBE_PROMPT, TRANSCRIBE_TOKENS
from ..runtime.families import doctags
from . import options as o

EngineName = enum.Enum("EngineName", {"local": "local", "ray": "ray"}, type=str)

EXAMPLES = {"transcribe": """
  idefics transcribe scans/ --out transcripts/          # one .md per document + records.jsonl
  idefics transcribe 'archive/**/*.pdf' --out pages.jsonl
  idefics transcribe invoices/ | jq -r 'select(.status=="ok") | .text'
  idefics transcribe scans/ --out transcripts/          # run again: picks up where it stopped
  idefics transcribe big/ --out part3.jsonl --shard 3/8  # one job of an array of 8
  idefics transcribe invoices/ --schema invoice.schema.json --out invoices.jsonl
"""}


@o.model_params(TRANSCRIBE_TOKENS)
@o.runs
def transcribe_command(
    output,
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
        "--min-confidence", metavar="P", help="Warn low_confidence on pages whose lowest field (or, without "
                                                  "--schema, token) probability is under P (0 to 1).")] = None,
    pages: o.PagesOpt = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> int:
    """Transcribe every page of files, folders or globs. JSONL records, and Markdown with --out DIR."""
    from ..process import one_malloc_arena
    from ..tasks.transcription import TranscribeRequest, Transcription

    one_malloc_arena()  # before any thread starts: flat peak memory over long runs
    output.quiet = quiet
    if server and engine != "local":
        raise UsageError("--server and --engine ray cannot be combined", "drop one of them")
    remote, side = o.connect_first(opts, server, api_key, output)  # a server's settings make the settings hash
    request = TranscribeRequest(tuple(paths), out, remote.options if remote else opts, prompt=prompt, pages=pages,
                                dpi=dpi, password=password, batch_size=batch_size, force=force, shard=shard,
                                engine=engine, ray_address=ray_address, schema=schema, min_confidence=min_confidence,
                                longest_side=side, doctags=remote.doctags if remote else doctags(opts))
    return Transcription(request, engine=remote, output=output).run()
