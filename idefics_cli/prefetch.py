"""Prefetch: the one owner of the transcribe path's concurrency (docs/batching.md).

Contract: `Prefetcher(docs, open_doc, select_pages, is_done, build, batch_size)` is iterated by the thread that
runs the model. Its one background thread opens documents, renders their chosen pages that are not done
yet, groups them into batches and builds each batch's model inputs (`build(images)`), and hands over, in
order, `Batch`es, `Failure`s (a document or page that failed before the model), `BlankPage`s (nothing to
read: no model) and `DocumentDone`s (after the batches holding all of a document's pages). All of its
concurrency lives here, behind one condition variable:
- the bound: at most `depth` items wait to be taken (1);
- the turn-taking: a batch is built only when every batch built before it has been taken by the model's
  thread, so the next batch is built while the model prefills the current one, never further ahead: a build
  overlaps that prefill, whose big matrix products lose less to a busy core than the decode's many small
  steps (bench/transcribe.py), and at most two batches' pixels exist at a time, whatever the page count
  (bench/memory.py); a failed build gives its turn back;
- the grouping: batches hold `batch_size` pages of one pixel size from a look-ahead window of at most two
  batches of rendered pages (full batches always; mixed sizes only when the window is full or at the end);
- stop and errors: leaving the loop (done, an exception, Ctrl-C) or `stop()` ends the thread at its next
  step; an exception in the thread is raised in the iterating one.
`start()` may start the thread before the first iteration (the transcribe pipeline does, while the weights load:
the first batch is ready when the model is); `close()` ends a prefetcher that is never iterated.
`on_pages(total, skipped)` is called from the thread once per opened document. `build` runs in the thread:
it must change no shared state (Engine.prepare does not) and use numpy rather than torch ops, which would
start a second OpenMP team that makes libgomp throttle the one that generates (engine.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from .batch import Batch, BlankPage, DocumentDone, Failure, Input, PageTask
from .errors import classify

_END = object()


class Window:
    """The look-ahead window: rendered pages not yet in a batch, taken out a batch at a time by pixel size."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[tuple[PageTask, object]] = []

    def add(self, task: PageTask, image) -> None:
        self.pending.append((task, image))

    def holds(self, item: Input) -> bool:
        return any(t.input == item for t, _ in self.pending)

    def next_batch(self, final: bool) -> list | None:
        """`batch_size` pages of one size if the window holds them; else, once the window is full (2 batches) or
        at the end, the oldest page's size first, topped up with the oldest others (a vision call per size)."""
        pending, size = self.pending, self.batch_size
        groups: dict = {}
        for k, (_, image) in enumerate(pending):
            groups.setdefault(getattr(image, "size", None), []).append(k)
        chosen = next((ks[:size] for ks in groups.values() if len(ks) >= size), None)
        if chosen is None and pending and (final or len(pending) >= 2 * size):
            first = groups[getattr(pending[0][1], "size", None)]
            chosen = (first + [k for k in range(len(pending)) if k not in set(first)])[:size]
        if chosen is None:
            return None
        take = set(chosen)
        out = [pending[k] for k in sorted(take)]
        pending[:] = [p for k, p in enumerate(pending) if k not in take]
        return out


class Prefetcher:
    """Documents in, ready batches out, built one batch ahead of the model in one background thread."""

    def __init__(self, docs: list[Input], open_doc, select_pages, is_done, build, batch_size: int, depth: int = 1,
                 on_pages=None):
        self.docs, self.open_doc, self.select_pages, self.is_done = docs, open_doc, select_pages, is_done
        self.build, self.on_pages, self.depth = build, on_pages, max(depth, 1)
        self.window = Window(batch_size)
        self.finished: list[DocumentDone] = []
        self._cond = threading.Condition()
        self._items: deque = deque()  # handed over, not yet taken (at most `depth`, plus the end mark)
        self._ahead = 0  # batches built or being built that the model's thread has not taken yet
        self._stopped = False
        self._thread = threading.Thread(target=self._produce, name="idefics-prefetch", daemon=True)

    # ---- the model's thread ------------------------------------------------------------------------------
    def start(self) -> Prefetcher:
        """Start the thread now (else the first iteration does): work begins before the model is there to take it."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop and join the thread (a prefetcher never iterated: the load it overlapped failed)."""
        self.stop()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def __iter__(self) -> Iterator[Batch | Failure | BlankPage | DocumentDone]:
        self.start()
        try:
            while True:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    item = self._items.popleft()
                    if isinstance(item, Batch):
                        self._ahead -= 1  # the model takes it: the next build may start (during this prefill)
                    self._cond.notify_all()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                item = None  # this batch's pixels are freed before the next one is waited for
        finally:
            self.stop()
            self._thread.join(timeout=5)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ---- the background thread ---------------------------------------------------------------------------
    def _put(self, item, end: bool = False) -> bool:
        """Hand an item over, waiting while `depth` items wait; False once stopped."""
        with self._cond:
            while not end and len(self._items) >= self.depth and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _take_turn(self) -> bool:
        """Wait until every batch built so far has been taken by the model; False once stopped."""
        with self._cond:
            while self._ahead and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._ahead += 1
            return True

    def _give_back_turn(self) -> None:
        with self._cond:
            self._ahead -= 1
            self._cond.notify_all()

    def _produce(self) -> None:
        try:
            for item in self.docs:
                if self._stopped or not self._document(item):
                    return
            self._flush(final=True)
        except BaseException as exc:  # noqa: BLE001 - raised in the model's thread
            self._put(exc, end=True)
        finally:
            self._put(_END, end=True)

    def _fail(self, item: Input, exc: BaseException, sha256: str = "", page: int = 0, pages: int = 0) -> bool:
        return self._put(Failure(item, classify(exc, item.path, "read"), sha256, page, pages))

    def _flush(self, final: bool = False) -> bool:
        """Hand over the batches the window allows, then the documents none of whose pages still wait."""
        while (ready := self.window.next_batch(final)) is not None:
            if not self._take_turn():
                return False
            t0 = time.perf_counter()
            batch = Batch([t for t, _ in ready], [im for _, im in ready])
            ready = None
            try:
                batch.inputs = self.build(batch.images)
            except Exception as exc:  # noqa: BLE001 - recorded per page
                self._give_back_turn()  # this batch never reaches the model: the next build may start
                ok = all(self._fail(t.input, exc, t.sha256, t.page, t.pages) for t in batch.tasks)
            except BaseException:
                self._give_back_turn()
                raise
            else:
                batch.preprocess_s = time.perf_counter() - t0
                ok = self._put(batch)
            batch = None
            if not ok:
                return False
        while self.finished and not self.window.holds(self.finished[0].input):
            if not self._put(self.finished.pop(0)):
                return False
        return True

    def _document(self, item: Input) -> bool:
        try:
            doc = self.open_doc(item.path)
        except Exception as exc:  # noqa: BLE001 - recorded for the document
            return self._fail(item, exc)
        with doc:
            try:
                chosen = self.select_pages(doc)
            except Exception as exc:  # noqa: BLE001
                return self._fail(item, exc, doc.sha256, 0, doc.page_count)
            todo = [p for p in chosen if not self.is_done(doc.sha256, p)]
            if self.on_pages:
                self.on_pages(len(chosen), len(chosen) - len(todo))
            for page in todo:
                try:
                    image = doc.render(page)
                except Exception as exc:  # noqa: BLE001
                    if not self._fail(item, exc, doc.sha256, page, doc.page_count):
                        return False
                    continue
                task = PageTask(item, doc.sha256, page, doc.page_count, doc.warnings(page))
                if "blank_page" in task.warnings:  # needs no model: recorded at once, before its DocumentDone
                    if not self._put(BlankPage(task)):
                        return False
                    continue
                self.window.add(task, image)
                image = None
                if not self._flush():
                    return False
            self.finished.append(DocumentDone(item, doc.sha256, chosen, doc.page_count))
            return self._flush()
