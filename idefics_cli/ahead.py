"""Work ahead of a consumer in one background thread: bounded, ordered, cancellable.

`WorkAhead(name, depth, places).start(produce)` runs `produce(work)` in a daemon thread: it hands items over with
`put(item)` (waits while `depth` wait) and takes one of `places` with `claim(pick)` (`release()` frees it); after
`stop()` they return False/None. Iterating gives the items in order, then the end or its exception. `in_thread(fn)`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future

_END = object()


class WorkAhead:
    def __init__(self, name: str, depth: int = 1, places: int = 1):
        self.name, self.depth, self.places = name, max(depth, 1), max(places, 0)
        self.cond = threading.Condition()
        self.held = 0  # places taken by `claim` and not released
        self.stopped = False
        self._items: deque = deque()
        self._error: BaseException | None = None  # what `produce` raised, handed on after the items
        self.thread: threading.Thread | None = None

    def start(self, produce: Callable[[WorkAhead], object]) -> WorkAhead:
        """Start the thread (once; later calls do nothing)."""
        with self.cond:
            if self.thread is not None:
                return self
            self.thread = threading.Thread(target=self._run, args=(produce,), name=self.name, daemon=True)
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        """Cancel: `put` and `claim` return at once (False/None) and no item is handed over any more."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def release(self) -> None:
        with self.cond:
            self.held -= 1
            self.cond.notify_all()

    def put(self, item) -> bool:
        """Hand `item` over, waiting while `depth` items wait; False once stopped."""
        with self.cond:
            while len(self._items) >= self.depth and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return False
            self._items.append(item)
            self.cond.notify_all()
            return True

    def claim(self, pick: Callable[[], object] = lambda: True):
        """Wait for a free place and for `pick()` (run under `cond`) to give something; take the place, return it.
        None once stopped."""
        with self.cond:
            while not self.stopped:
                if self.held < self.places and (work := pick()) is not None:
                    self.held += 1
                    return work
                self.cond.wait()
            return None

    def _run(self, produce) -> None:
        try:
            produce(self)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        with self.cond:
            self._items.append(_END)  # past the bound: the producer never waits to finish
            self.cond.notify_all()

    def __iter__(self) -> Iterator:
        while True:
            with self.cond:
                while not self._items:
                    self.cond.wait()
                item = self._items.popleft()
                self.cond.notify_all()
            if item is _END:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return
            yield item
            item = None  # let go of it before waiting for the next one


def in_thread(fn: Callable[[], object], name: str) -> Future:
    """`fn()` run in a new daemon thread, which ends with it; the Future of its result (or exception)."""
    from concurrent.futures import Future  # imported when needed: it brings logging

    future = Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - the Future holds it for whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
