"""The prefix cache: key/value caches of prompts' image prefixes, least recently used out first, bounded by bytes.

Contract: `prefix_key(settings, ids, images)` names a prefix by the model's settings, its token ids and its
images' content, so two requests share an entry exactly when the model sees the same prefix. `PrefixCache(max_bytes)`:
`get` (counted in `hits`/`misses`, marks it recent), `contains` (neither), `put` (evicts the least recently used
until the `nbytes` fit; a value over the whole budget is not stored). Thread-safe; no torch.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def prefix_key(settings: str, ids: list[int], images: list) -> str:
    """The key of a prefix: the settings, its token ids and its decoded images (mode, size and pixels)."""
    digest = hashlib.sha256(settings.encode())
    digest.update(b"\0" + ",".join(map(str, ids)).encode())
    for image in images:
        digest.update(f"\0{image.mode}:{image.width}x{image.height}:".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
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
        size = int(value.nbytes)
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= int(old.nbytes)
            while self.entries and self.bytes + size > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= int(evicted.nbytes)
            self.entries[key] = value
            self.bytes += size
            return True

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}
