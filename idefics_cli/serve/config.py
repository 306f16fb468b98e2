"""Server settings and the checks made before a socket is opened.

Contract: `ServeConfig` holds what `idefics serve` was given; `check(config)` raises `UsageError` for unsafe or
impossible settings (a non-loopback host without an API key; non-positive limits). `default_cache_bytes(device)`
sizes the prefix cache without --cache-mb: a quarter of free GPU memory, else a tenth of free RAM up to 4 GiB.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import UsageError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 16
    max_batch: int = 4
    cache_mb: float | None = None
    max_request_mb: float = 64.0
    grace: float = 30.0
    cors: str | None = None


def is_loopback(host: str) -> bool:
    try:
        return host.strip().lower() == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(config: ServeConfig) -> None:
    if not is_loopback(config.host) and not config.api_key:
        raise UsageError(f"refusing to serve on {config.host} without an API key: anyone who can reach it could use it",
                         "pass --api-key KEY (or set IDEFICS_API_KEY), or keep the default --host 127.0.0.1")
    if config.api_key is not None and not config.api_key.strip():
        raise UsageError("the API key is empty", "pass a non-empty --api-key")
    if config.max_batch < 1 or config.max_queue < 0:
        raise UsageError("--max-batch must be at least 1 and --max-queue at least 0")
    if config.max_request_mb <= 0 or (config.cache_mb is not None and config.cache_mb < 0):
        raise UsageError("--max-request-mb must be positive and --cache-mb not negative")
    if config.grace < 0:
        raise UsageError("--grace must not be negative")


def default_cache_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0] * 0.25)
    from ..runtime.vision import _available_ram

    return int(min(_available_ram() * 0.1, 4 * 2**30))
