"""The prefix cache: key/value caches of prompts' image prefixes, least recently used out first, bounded by bytes.

Contract: `prefix_key(settings, ids, digests)` names a prefix by the model's settings, its token ids and its images'
content; a page's `Seen` lets it skip its decoding while its prefix is cached. `PrefixCache(max_bytes,
size)`: `get` (counted in `hits`/`misses`), `contains` (not counted), `put` (evicts the least recently used until the
value's `size`, default `nbytes`, fits; one over the whole budget is not stored). Thread-safe; no torch.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass


def image_digest(image) -> str:
    """The content of a decoded image: its mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def prefix_key(settings: str, ids: list[int], digests: list[str]) -> str:
    """The key of a prefix: the settings, its token ids and its images' `image_digest`s."""
    digest = hashlib.sha256(settings.encode())
    digest.update(b"\0" + ",".join(map(str, ids)).encode())
    for image in digests:
        digest.update(b"\0" + image.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Seen:
    """A page decoded before: its mode, size and digest, without its pixels (a prompt's ids need only its size)."""

    mode: str
    width: int
    height: int
    digest: str


class PrefixCache:
    def __init__(self, max_bytes: int, size=lambda value: int(value.nbytes)):
        self.max_bytes, self.size = max(0, int(max_bytes)), size
        self.entries: OrderedDict[str, object] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return value

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self.entries

    def put(self, key: str, value) -> bool:
        """Store `value` (evicting the least recently used); False when it alone is over the budget."""
        size = self.size(value)
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= self.size(old)
            while self.entries and self.bytes + size > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= self.size(evicted)
            self.entries[key] = value
            self.bytes += size
            return True

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}

