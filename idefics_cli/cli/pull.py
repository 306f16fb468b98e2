"""`idefics pull [MODEL]`: download a model's weights, config and processor files into the HF cache.

Contract: parsing and printing over the library's `hub.pull` (docs/pull.md): the local snapshot folder on stdout
(one line); no network, gated or missing repositories are one-line `model_error`s (exit 5).
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o

EXAMPLES = """
  idefics pull                                        # HuggingFaceM4/idefics2-8b
  idefics pull HuggingFaceM4/idefics2-8b-chatty --revision main
  HF_HOME=/data/hf idefics pull && HF_HOME=/data/hf idefics ask --offline doc.pdf "Summary?"
"""


@o.runs
def pull_command(
    out,
    model: Annotated[str, typer.Argument(metavar="MODEL", envvar="IDEFICS_MODEL", show_default=True,
                                         help="Hub id of the model.")] = o.DEFAULT_MODEL,
    revision: o.Revision = None,
) -> int:
    """Download a model into the Hugging Face cache. Weights, config and processor files, for --offline."""
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
