"""`idefics pull [MODEL]`: download a model's weights, config and processor files into the HF cache.

Contract: parsing and printing over the library's `hub.pull`: it fetches only what loading needs
(`*.safetensors`, `*.json`, `tokenizer.model`, `*.jinja`, `*.txt`), progress bars on stderr, and this prints
the local snapshot folder on stdout (one line). Before downloading, the hub (or the configured proxy) is
probed, so with no network it fails within seconds with a one-line `model_error` (exit 5) instead of
retrying for minutes. Offline (the hub's offline variable set in the environment, read by cli/options.py)
it only reports a model that is already cached. Gated, missing and mistyped repositories and revisions are
one-line `model_error`s too.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o

EPILOG = """Examples:

\b
  idefics pull                                        # HuggingFaceM4/idefics2-8b
  idefics pull HuggingFaceM4/idefics2-8b-chatty --revision main
  HF_HOME=/data/hf idefics pull && HF_HOME=/data/hf idefics ask --offline doc.pdf "Summary?"
"""


def pull_command(
    model: Annotated[str, typer.Argument(metavar="MODEL", envvar="IDEFICS_MODEL", show_default=True,
                                         help="Hub id of the model.")] = o.DEFAULT_MODEL,
    revision: o.Revision = None,
) -> None:
    """Download a model into the Hugging Face cache. Weights, config and processor files, for --offline."""
    from ..output import Output

    out = Output()
    o.run_and_exit(lambda: _pull(out, model, revision), out)


def _pull(out, model: str, revision: str | None) -> int:
    import os

    from ..errors import UsageError
    from ..hub import looks_local, pull
    from ..tasks.doctor import dir_size, human_bytes

    if looks_local(model):
        raise UsageError(f"{model} is a local path; pull downloads a model from the hub", "pass a hub id (owner/name)")
    offline = f"{o.OFFLINE_ENV} is set" if o.env_offline() else None
    path = pull(model, revision, offline,
                on_start=lambda cache: out.info(f"Pulling {model}{'@' + revision if revision else ''} into {cache}…"))
    note = " (already cached, offline)" if offline else ""
    out.info(f"{model} @ {os.path.basename(path)}: {human_bytes(dir_size(path))}{note}")
    out.write(path + "\n")
    return 0
