"""Where the model comes from: a local folder, the Hugging Face cache, or the hub (probed before loading).

Contract: `check_local_model(path)` refuses a folder that is not a safetensors model before anything is
read; `looks_local(name)` tells a path from a hub id; `local_only(options)` says whether loading must stay
off the network (offline, a local folder, or a hub id already cached) and raises `IdeficsError("model_error")`
within seconds when the model is not cached and the hub cannot be reached. No heavy imports.
"""

from __future__ import annotations

import os

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


def is_cached(model: str, revision: str | None) -> bool:
    """True when config and weights of a hub model are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(model, name, revision=revision), str)

    return cached("config.json") and (cached("model.safetensors.index.json") or cached("model.safetensors"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so a machine without network fails in seconds, not minutes."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def local_only(options) -> bool:
    """Whether to load without touching the network: offline, a local folder, or a hub id already cached."""
    if options.offline or looks_local(options.model):
        return True
    if is_cached(options.model, options.revision):
        return True
    if not hub_reachable():
        raise IdeficsError("model_error", f"{options.model} is not in the local cache and the hub cannot be reached",
                           "run `idefics pull` with network access first, or point --model at a local copy")
    return False
