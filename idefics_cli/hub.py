"""Where the model comes from: a local folder, the Hugging Face cache, or the hub (probed before loading).

`local_only(options, need)` says whether loading stays off the network, and raises `IdeficsError("model_error")`
before any heavy import for a hub id not cached when offline or unreachable; `source(...)` is what loaders hand
`from_pretrained`; `pull(...)` downloads. Offline is the caller's option: no environment variable is read or set.
"""

from __future__ import annotations

import os

from .ahead import in_thread
from .errors import IdeficsError
from .process import env_seconds, quiet_hub


def check_local_model(path: str) -> None:
    """Refuse a local folder that is not a safetensors model, before anything is unpickled."""
    if not os.path.isdir(path):
        raise IdeficsError("model_error", f"model folder {path!r} does not exist", "give a hub id or a local folder")
    names = os.listdir(path)
    if "config.json" not in names:
        raise IdeficsError("model_error", f"{path} has no config.json", "is it a saved model folder?")
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        raise IdeficsError("model_error", f"{path} has no .safetensors weights (only safetensors are loaded)",
                           "convert the weights to safetensors")


def looks_local(model: str) -> bool:
    return names_path(model) or model.count("/") > 1


def names_path(model: str) -> bool:
    """Whether `model` is written as a path on this machine (absolute, ./ or ~, or one that exists)."""
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)


def hub_id(model: str) -> bool:
    """Whether `model` is spelled as a hub repository id (name or owner/name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def cached_snapshot(model: str, revision: str | None, need: str = "model") -> str | None:
    """A hub id's snapshot folder in the HF cache when what `need` ("model" or "processor") needs is there."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        try:
            path = try_to_load_from_cache(model, name, revision=revision)
        except Exception:  # noqa: BLE001 - an invalid repo id or revision is "not cached"
            return None
        return path if isinstance(path, str) else None

    if need == "processor":
        found = cached("preprocessor_config.json") or cached("processor_config.json")
    else:
        weights = cached("model.safetensors.index.json") or cached("model.safetensors")
        found = cached("config.json") if weights else None
    return os.path.dirname(found) if found else None


def source(options, local_files_only: bool, need: str = "model") -> str:
    """What to hand `from_pretrained`: loading locally, a cached hub id's folder (the hub's download path, which may
    connect even with `local_files_only`, is never entered); else `options.model`."""
    if local_files_only and not looks_local(options.model):
        return cached_snapshot(options.model, options.revision, need) or options.model
    return options.model


def probe_endpoint(url: str, timeout: float = 4.0) -> str | None:
    """None when the hub answers an HTTP HEAD within `timeout` (any status), else why not (in a thread: name
    resolution ignores timeouts)."""
    from concurrent.futures import TimeoutError as NoAnswer

    from huggingface_hub.utils import get_session

    def attempt() -> str | None:
        try:
            get_session().head(url, timeout=timeout)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means "unreachable"
            return (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__

    try:
        return in_thread(attempt, name="idefics-probe").result(timeout + 1)
    except NoAnswer:
        return f"no answer within {timeout:g} s"


PULL_HINT = "run `idefics pull` with network access first, or point --model at a local copy"


def local_only(options, need: str = "model") -> bool:
    """Whether loading stays off the network (a local folder or a cached hub id); a hub id not cached fails here
    when `options.offline` or the hub does not answer within `IDEFICS_PROBE_TIMEOUT` s (1.5)."""
    if looks_local(options.model):
        return True
    quiet_hub()  # commands: no retry chatter on stderr (process.py)
    if cached_snapshot(options.model, options.revision, need):
        return True
    if options.offline:
        raise IdeficsError("model_error", f"{options.model} is not in the local cache (offline)", PULL_HINT)
    from huggingface_hub import constants

    why = probe_endpoint(constants.ENDPOINT, timeout=env_seconds("IDEFICS_PROBE_TIMEOUT", 1.5))
    if why is not None:
        raise IdeficsError("model_error", f"{options.model} is not in the local cache and the hub cannot be reached "
                                          f"({why})", PULL_HINT)
    return False


ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]  # what loading needs


def pull(model: str, revision: str | None, offline: str | None = None, on_start=None) -> str:
    """Download what loading needs into the HF cache (the hub probed first); the snapshot folder. `offline`: why
    (then only looked up in the cache: one without weights or processor is a `model_error`); `on_start(cache_folder)`
    is called as the download starts."""
    from huggingface_hub import constants, snapshot_download

    if offline is None:
        why = probe_endpoint(constants.ENDPOINT, timeout=env_seconds("IDEFICS_PROBE_TIMEOUT", 5.0))
        if why:
            raise IdeficsError("model_error", f"cannot reach the hub {constants.ENDPOINT} ({why})",
                               "check the network or proxy; offline, copy a pulled HF cache and use --offline")
    if on_start is not None:
        on_start(constants.HF_HUB_CACHE)
    try:
        path = snapshot_download(model, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=offline is not None, etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        raise pull_error(exc, model, revision, offline) from exc
    if offline is not None and not (cached_snapshot(model, revision) and cached_snapshot(model, revision, "processor")):
        raise IdeficsError("model_error", f"{model} is only partly in the local cache and {offline}",
                           "turn offline mode off to download the rest")
    return path


def pull_error(exc: Exception, model: str, revision: str | None, offline: str | None) -> IdeficsError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return IdeficsError("model_error", f"{model} is gated", "accept its license on the hub, then `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return IdeficsError("model_error", f"model {model!r} was not found on the hub", "check the id (owner/name)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return IdeficsError("model_error", f"revision {revision!r} of {model} was not found", "check --revision")
    if offline is not None:
        return IdeficsError("model_error", f"{model} is not in the local cache and {offline}",
                            "turn offline mode off to download it")
    if isinstance(exc, errors.LocalEntryNotFoundError):  # the hub failed after the probe got an answer
        why = str(exc).splitlines()[0].removeprefix("Got: ")[:200] if str(exc) else type(exc).__name__
        return IdeficsError("model_error", f"could not download {model} from the hub ({why})",
                            "check the network, proxy or HF_ENDPOINT; run it again to resume")
    if isinstance(exc, OSError) and "No space left" in str(exc):
        return IdeficsError("model_error", "no space left on the device for the download", "free space or set HF_HOME")
    text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return IdeficsError("model_error", f"download of {model} failed: {text}", "run it again: it resumes")
