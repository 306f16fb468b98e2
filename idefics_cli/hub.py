"""Where the model comes from: a local folder, the Hugging Face cache, or the hub (probed before loading).

Contract: `check_local_model(path)` refuses a folder that is not a safetensors model before anything is
read; `looks_local(name)` tells a path from a hub id; `local_only(options, need)` is the one fast path of every
command that loads a model or processor: it says whether loading stays off the network (a local folder, or a
hub id already cached) and raises `IdeficsError("model_error")` before any heavy import when a hub id is not
cached and either we are offline ("not in the local cache") or the hub cannot be reached; `probe_endpoint(url)`
says why the hub (or the proxy) cannot be reached, or None. No heavy imports.
"""

from __future__ import annotations

import os
import threading

from .errors import IdeficsError


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
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") > 1


def is_cached(model: str, revision: str | None, need: str = "model") -> bool:
    """True when what loading needs is already in the local Hugging Face cache: config and weights for
    `need="model"`, the processor's config for `need="processor"`."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(model, name, revision=revision), str)
        except Exception:  # noqa: BLE001 - an invalid repo id or revision is "not cached"
            return False

    if need == "processor":
        return cached("preprocessor_config.json") or cached("processor_config.json")
    return cached("config.json") and (cached("model.safetensors.index.json") or cached("model.safetensors"))


def probe_endpoint(url: str, timeout: float = 4.0) -> str | None:
    """None when the hub answers an HTTP HEAD within `timeout` (any status), else why not.

    Uses huggingface_hub's own HTTP session, so proxies and certificates are honoured; runs in a thread
    because name resolution ignores timeouts.
    """
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def attempt():
        try:
            get_session().head(url, timeout=timeout)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means "unreachable"
            outcome.append((str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="idefics-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


PULL_HINT = "run `idefics pull` with network access first, or point --model at a local copy"


def local_only(options, need: str = "model") -> bool:
    """Whether to load without touching the network: a local folder, or a hub id already cached. The one fast
    path of every command that loads a model or processor: a hub id that is not cached fails here, before any
    heavy import, when offline (`--offline`, HF_HUB_OFFLINE) or when the hub cannot be reached within
    `IDEFICS_PROBE_TIMEOUT` seconds (default 1.5). `need` is "model" or "processor" (see `is_cached`)."""
    if looks_local(options.model):
        return True
    _quiet_hub()
    if is_cached(options.model, options.revision, need):
        return True
    if options.offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise IdeficsError("model_error", f"{options.model} is not in the local cache (offline)", PULL_HINT)
    from huggingface_hub import constants

    why = probe_endpoint(constants.ENDPOINT, timeout=float(os.environ.get("IDEFICS_PROBE_TIMEOUT", "1.5")))
    if why is not None:
        raise IdeficsError("model_error", f"{options.model} is not in the local cache and the hub cannot be reached "
                                          f"({why})", PULL_HINT)
    return False


def _quiet_hub() -> None:
    """No retry chatter from huggingface_hub on stderr (IDEFICS_DEBUG=1 keeps it)."""
    if not os.environ.get("IDEFICS_DEBUG"):
        from huggingface_hub.utils import logging

        logging.set_verbosity_error()
