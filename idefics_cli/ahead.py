"""Work ahead of a consumer in one background thread: bounded, ordered, cancellable.

Contract: `WorkAhead(name, depth, places)`; `start(produce)` runs `produce(work)` in a daemon thread `name`.
The producer hands items over in order with `put(item)` (waits while `depth` items wait untaken) and takes one
of `places` before each costly piece of work with `claim(pick)` (waits until a place is free and `pick()`, run
under `cond`, gives something); `release()` frees a place (the consumer took the work, or it failed). Once
`stop()` is called they return False/None, and the producer should return. The consumer iterates: the items in
order, then the end when `produce` returns, or its exception. `cond` guards the owner's own state too.
`in_thread(fn, name)`: `fn()` in a new daemon thread (a process that exits does not wait for it); its Future.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future

_END = object()


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class WorkAhead:
    def __init__(self, name: str, depth: int = 1, places: int = 1):
        self.name, self.depth, self.places = name, max(depth, 1), max(places, 0)
        self.cond = threading.Condition()
        self.held = 0  # places taken by `claim` and not released
        self.stopped = False
        self._items: deque = deque()
        self.thread: threading.Thread | None = None

    # ---- both sides -----------------------------------------------------------------------------------------
    def start(self, produce: Callable[[WorkAhead], object]) -> WorkAhead:
        """Start the thread (once; later calls do nothing)."""
        with self.cond:
            if self.thread is not None:
                return self
            self.thread = threading.Thread(target=self._run, args=(produce,), name=self.name, daemon=True)
        self.thread.start()
        return self

    def started(self) -> bool:
        return self.thread is not None

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

    # ---- the producer ---------------------------------------------------------------------------------------
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
        """Wait for a free place and for `pick()` to return something (not None); take the place and return it.
        None once stopped."""
        with self.cond:
            while not self.stopped:
                if self.held < self.places and (work := pick()) is not None:
                    self.held += 1
                    return work
                self.cond.wait()
            return None

    def _run(self, produce) -> None:
        end = _END
        try:
            produce(self)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            end = _Raised(exc)
        with self.cond:
            self._items.append(end)  # past the bound: the producer never waits to finish
            self.cond.notify_all()

    # ---- the consumer ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        while True:
            with self.cond:
                while not self._items:
                    self.cond.wait()
                item = self._items.popleft()
                self.cond.notify_all()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
            item = None  # let go of it before waiting for the next one


def in_thread(fn: Callable[[], object], name: str) -> Future:
    """`fn()` run in a new daemon thread, which ends with it; the Future of its result (or exception)."""
    from concurrent.futures import Future  # imported when needed: it brings logging (ms at every command's start)

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
