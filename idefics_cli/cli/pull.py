"""`idefics pull [MODEL]`: download a model's weights, config and processor files into the HF cache.

Contract: fetches only what loading needs (`*.safetensors`, `*.json`, `tokenizer.model`, `*.jinja`, `*.txt`)
with `huggingface_hub.snapshot_download`, progress bars on stderr, and prints the local snapshot folder
on stdout (one line). Before downloading, the hub (or the configured proxy) is probed with a short TCP
connect, so with no network it fails within seconds with a one-line `model_error` (exit 5) instead of
retrying for minutes. With HF_HUB_OFFLINE set it only reports a model that is already cached. Gated,
missing and mistyped repositories and revisions are one-line `model_error`s too.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]
EPILOG = """Examples:

\b
  idefics pull                                        # HuggingFaceM4/idefics2-8b
  idefics pull HuggingFaceM4/idefics2-8b-chatty --revision main
  HF_HOME=/data/hf idefics pull && HF_HOME=/data/hf idefics ask --offline doc.pdf "Summary?"
"""


def pull(
    model: Annotated[str, typer.Argument(metavar="MODEL", envvar="IDEFICS_MODEL", show_default=True,
                                         help="Hub id of the model.")] = o.DEFAULT_MODEL,
    revision: o.Revision = None,
) -> None:
    """Download the model's safetensors, config and processor files into the HF cache (for offline use)."""
    from ..output import Output

    out = Output()
    o.run_and_exit(lambda: _pull(out, model, revision), out)


def _pull(out, model: str, revision: str | None) -> int:
    import os

    from ..diagnostics import human_bytes
    from ..errors import IdeficsError, UsageError
    from ..hub import looks_local, probe_endpoint

    if looks_local(model):
        raise UsageError(f"{model} is a local path; pull downloads a model from the hub", "pass a hub id (owner/name)")
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    if not offline:
        why = probe_endpoint(constants.ENDPOINT, timeout=float(os.environ.get("IDEFICS_PROBE_TIMEOUT", "5")))
        if why:
            raise IdeficsError("model_error", f"cannot reach the hub {constants.ENDPOINT} ({why})",
                               "check the network or proxy; offline, copy a pulled HF cache and use --offline")
    out.info(f"Pulling {model}{'@' + revision if revision else ''} into {constants.HF_HUB_CACHE}…")
    try:
        path = snapshot_download(model, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=offline,
                                 etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        raise pull_error(exc, model, revision, offline) from exc
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    note = " (already cached, offline)" if offline else ""
    out.info(f"{model} @ {os.path.basename(path)}: {human_bytes(size)}{note}")
    out.write(path + "\n")
    return 0


def pull_error(exc: Exception, model: str, revision: str | None, offline: bool):
    from huggingface_hub import errors

    from ..errors import IdeficsError

    if isinstance(exc, errors.GatedRepoError):
        return IdeficsError("model_error", f"{model} is gated", "accept its license on the hub, then `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return IdeficsError("model_error", f"model {model!r} was not found on the hub", "check the id (owner/name)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return IdeficsError("model_error", f"revision {revision!r} of {model} was not found", "check --revision")
    if offline:
        return IdeficsError("model_error", f"{model} is not in the local cache and HF_HUB_OFFLINE is set",
                            "unset HF_HUB_OFFLINE to download it")
    if isinstance(exc, errors.LocalEntryNotFoundError):  # the hub failed after the probe got an answer
        why = str(exc).splitlines()[0].removeprefix("Got: ")[:200] if str(exc) else type(exc).__name__
        return IdeficsError("model_error", f"could not download {model} from the hub ({why})",
                            "check the network, proxy or HF_ENDPOINT; run it again to resume")
    if isinstance(exc, OSError) and "No space left" in str(exc):
        return IdeficsError("model_error", "no space left on the device for the download", "free space or set HF_HOME")
    text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return IdeficsError("model_error", f"download of {model} failed: {text}", "run it again: it resumes")
