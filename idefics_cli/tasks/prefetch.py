"""Prefetch: documents in, ready batches out, one batch ahead of the model (docs/batching.md).

Contract: `Prefetcher(docs, open_doc, select_pages, is_done, build, batch_size)` is iterated by the model's thread.
Its one thread (ahead.py's `WorkAhead`) opens documents, renders their chosen pages not done yet, groups them
into batches (`Window`: `batch_size` pages of one pixel size from at most two batches of rendered pages; mixed
sizes only when full or at the end) and builds each batch's inputs (`build(images)`), handing over in order
`Batch`es, `Failure`s, `BlankPage`s and `DocumentDone`s (after all of a document's batches). At most `depth`
items wait, and a batch is built only once every batch before it was taken (its one place), so a build
overlaps the model's prefill and at most two batches' pixels exist. `start()` starts early (while the weights
load); leaving the loop or `close()` stops the thread; its exceptions are raised in the iterating thread.
`on_pages(total, skipped)` is called per opened document. `build` must change no shared state and use numpy,
not torch ops (a second OpenMP team slows the one that generates: engine.py).
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
        # the turn is its one place: claimed before a build, released when the model's thread takes the batch
        self._work = WorkAhead("idefics-prefetch", depth=self.depth, places=1)

    # ---- the model's thread ------------------------------------------------------------------------------
    def start(self) -> Prefetcher:
        """Start the thread now (else the first iteration does): work begins before the model is there to take it."""
        self._work.start(self._produce)
        return self

    def close(self) -> None:
        """Stop and join the thread (a prefetcher never iterated: the load it overlapped failed)."""
        self.stop()
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

    def stop(self) -> None:
        self._work.stop()

    # ---- the background thread ---------------------------------------------------------------------------
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
            except Exception as exc:  # noqa: BLE001 - recorded per page
                self._work.release()  # this batch never reaches the model: the next build may start
                ok = all(self._fail(t.input, exc, t.sha256, t.page, t.pages) for t in batch.tasks)
            except BaseException:
                self._work.release()
                raise
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
            for page in todo:
                try:
                    image = doc.render(page)
                except Exception as exc:  # noqa: BLE001
                    if not self._fail(item, exc, doc.sha256, page, doc.page_count):
                        return False
                    continue
                task = PageTask(item, doc.sha256, page, doc.page_count, doc.warnings(page))
                if "blank_page" in task.warnings:  # needs no model: recorded at once, before its DocumentDone
                    if not self._work.put(BlankPage(task)):
                        return False
                    continue
                self.window.add(task, image)
                image = None
                if not self._flush():
                    return False
            self.finished.append(DocumentDone(item, doc.sha256, chosen, doc.page_count))
            return self._flush()
