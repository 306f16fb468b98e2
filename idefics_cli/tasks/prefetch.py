"""Prefetch: documents in, ready batches out, one batch ahead of the model (docs/batching.md).

Contract: iterating `Prefetcher(docs, open_doc, select_pages, is_done, build, batch_size)` yields in order `Batch`es
(inputs made by `build(images)`), `Failure`s, `BlankPage`s and `DocumentDone`s, made by one thread (ahead.WorkAhead)
that builds a batch only once the one before was taken: at most two batches' pixels exist. `start()` starts early;
leaving the loop or `close()` stops it; its exceptions are raised in the iterating thread. `build` must change no
shared state and use numpy, not torch ops (a second OpenMP team slows the one that generates: engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from ..ahead import WorkAhead
from ..errors import classify
from .batch import Batch, BlankPage, DocumentDone, Failure, Input, PageTask


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
        """`batch_size` pages of one size; else, once the window holds 2 batches or at the end, the oldest page's
        size first, topped up with the oldest others (a vision call per size)."""
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

    def __init__(self, docs: list[Input], open_doc, select_pages, is_done, build, batch_size: int, on_pages=None):
        self.docs, self.open_doc, self.select_pages, self.is_done = docs, open_doc, select_pages, is_done
        self.build, self.on_pages = build, on_pages  # on_pages(total, skipped): per opened document
        self.window = Window(batch_size)
        self.finished: list[DocumentDone] = []
        # the turn is its one place: claimed before a build, released when the model's thread takes the batch
        self._work = WorkAhead("idefics-prefetch", depth=1, places=1)

    def start(self) -> Prefetcher:
        """Start the thread now (else the first iteration does): work begins before the model is there to take it."""
        self._work.start(self._produce)
        return self

    def close(self) -> None:
        """Stop and join the thread (a prefetcher never iterated: the load it overlapped failed)."""
        self._work.stop()
        self._work.join(timeout=5)

    def __iter__(self) -> Iterator[Batch | Failure | BlankPage | DocumentDone]:
        self.start()
        try:
            for item in self._work:
                if isinstance(item, Batch):
                    self._work.release()  # the model takes it: the next build may start (during this prefill)
                yield item
                item = None  # this batch's pixels are freed before the next one is waited for
        finally:
            self.close()

    def _produce(self, work: WorkAhead) -> None:
        for item in self.docs:
            if work.stopped or not self._document(item):
                return
        self._flush(final=True)

    def _fail(self, item: Input, exc: BaseException, sha256: str = "", page: int = 0, pages: int = 0) -> bool:
        return self._work.put(Failure(item, classify(exc, item.path, "read"), sha256, page, pages))

    def _flush(self, final: bool = False) -> bool:
        """Hand over the batches the window allows, then the documents none of whose pages still wait."""
        while (ready := self.window.next_batch(final)) is not None:
            if self._work.claim() is None:  # every batch built so far taken by the model
                return False
            t0 = time.perf_counter()
            batch = Batch([t for t, _ in ready], [im for _, im in ready])
            ready = None
            try:
                batch.inputs = self.build(batch.images)
            except BaseException as exc:
                self._work.release()  # this batch never reaches the model: the next build may start
                if not isinstance(exc, Exception):
                    raise
                ok = all(self._fail(t.input, exc, t.sha256, t.page, t.pages) for t in batch.tasks)
            else:
                batch.preprocess_s = time.perf_counter() - t0
                ok = self._work.put(batch)
            batch = None
            if not ok:
                return False
        while self.finished and not self.window.holds(self.finished[0].input):
            if not self._work.put(self.finished.pop(0)):
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
            if not all(self._page(item, doc, page) for page in todo):
                return False
            self.finished.append(DocumentDone(item, doc.sha256, chosen, doc.page_count))
            return self._flush()

    def _page(self, item: Input, doc, page: int) -> bool:
        try:
            image = doc.render(page)
        except Exception as exc:  # noqa: BLE001 - recorded for the page
            return self._fail(item, exc, doc.sha256, page, doc.page_count)
        task = PageTask(item, doc.sha256, page, doc.page_count, doc.warnings(page))
        if "blank_page" in task.warnings:  # needs no model: recorded at once, before its DocumentDone
            return self._work.put(BlankPage(task))
        self.window.add(task, image)
        image = None
        return self._flush()
