"""Pixels ahead of the worker: queued jobs' image pixels built in one background thread, in queue order.

Contract:
- `Ahead(build, key, hit, ahead)`: `build(images, stop)` builds one prompt's pixels (backend.build_pixels:
  transformers' image processor, numpy only, no torch op, one source image at a time; None once `stop()` is
  true between two images); `key(job)` is the job's prefix-cache key (it hashes the images; None without an
  image prefix or a cache); `hit(key)` says whether the prefix cache holds that prefix (a job that will be
  prefilled from the cache needs no pixels, so none are built; the cache may still drop it before the job's
  turn: the worker then builds them itself).
- `add(job)` (at submit, in queue order) queues a job that has images. `start()` runs the thread
  (`idefics-pixels`; with `ahead` 0 there is none and the worker builds every job's pixels, as before);
  `stop()` ends it (after the source image it is building), `join(timeout)` waits for it.
- The bound: at most `ahead` jobs' pixels are being built or built and not yet taken by the worker; a job that
  is cancelled (`wake()`, which `Job.cancel` calls, frees its pixels at once), whose build failed, or that is
  a predicted cache hit holds no place. Once built, a job's source images are dropped (its pixels replace them).
- `take(job)` (the worker, when it admits the job): waits while this job's pixels are being built, or while
  they are still queued for a thread that runs and has a free place; returns the collected `VisionInputs`
  (for backend.encode_images), or None when the worker must build them itself (no images, a predicted cache
  hit, the thread stopped, or every place held by jobs the worker has not taken: never in queue order);
  raises the build's error (`errors.classify` with stage `read`: `corrupt`, or `out_of_memory`), which fails
  that job only: the thread goes on with the next one.
- `failed(job)`: its build failed (the worker ends it at once, before its turn). `drop(job)`: a job leaving
  without being admitted (cancelled) frees what it holds. `held()`: jobs holding a place now (/health's
  `pixels_ahead`); `built`: jobs whose pixels the thread built.
Nothing here imports numpy or torch.
"""

from __future__ import annotations

import threading
from collections import deque

from ..errors import classify

THREAD = "idefics-pixels"
QUEUED, BUILDING, READY, SKIPPED, FAILED, GONE = "queued", "building", "ready", "skipped", "failed", "gone"


class Entry:
    """One job's pixels: its state, the built `VisionInputs` (READY) or the build's error (FAILED)."""

    __slots__ = ("state", "vision", "error", "dropped")

    def __init__(self):
        self.state, self.vision, self.error, self.dropped = QUEUED, None, None, False


class Ahead:
    def __init__(self, build, key, hit, ahead: int):
        self.build, self.key, self.hit, self.ahead = build, key, hit, max(0, ahead)
        self.cond = threading.Condition()
        self.queue: deque = deque()  # jobs not yet looked at by the thread, in queue order
        self.ready: list = []  # jobs whose pixels are built and not yet taken
        self.building = None  # the job whose pixels are being built
        self.stopped = False
        self.built = 0  # jobs whose pixels the thread built
        self.thread: threading.Thread | None = None

    def held(self) -> int:
        """Jobs holding a place now: built and not taken, or being built."""
        with self.cond:
            return self._held()

    def _held(self) -> int:
        return len(self.ready) + (self.building is not None)

    # ---- the callers' side (submit, cancel, the worker) ---------------------------------------------------
    def add(self, job) -> None:
        if not job.images or self.ahead < 1:
            return
        with self.cond:
            job.pixels = Entry()
            self.queue.append(job)
            self.cond.notify_all()

    def start(self) -> None:
        if self.ahead < 1:
            return
        self.thread = threading.Thread(target=self._run, name=THREAD, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def wake(self) -> None:
        """A job was cancelled: its built pixels go now, and the thread may build the next job's."""
        with self.cond:
            self._purge()
            self.cond.notify_all()

    def failed(self, job) -> bool:
        entry = job.pixels
        return entry is not None and entry.state == FAILED

    def drop(self, job) -> None:
        entry = job.pixels
        if entry is None:
            return
        with self.cond:
            if entry.state == BUILDING:
                entry.dropped = True  # the thread stops between two images and keeps nothing
            else:
                self._release(job)

    def take(self, job):
        """The job's built pixels (a `VisionInputs`), or None: the worker builds them itself."""
        entry = job.pixels
        if entry is None:
            return None
        with self.cond:
            while entry.state == BUILDING or (entry.state == QUEUED and self._coming(job)):
                self.cond.wait()
            state, vision, error = entry.state, entry.vision, entry.error
            self._release(job)
        if state == FAILED:
            raise error
        return vision if state == READY else None

    def _coming(self, job) -> bool:
        """Will the thread build this queued job's pixels without the worker taking anything first?"""
        running = self.thread is not None and self.thread.is_alive() and not self.stopped
        return running and self._held() < self.ahead and any(j is job for j in self.queue)

    def _release(self, job) -> None:
        entry = job.pixels
        self.ready = [j for j in self.ready if j is not job]
        entry.vision = None
        entry.state = GONE if entry.state != FAILED else FAILED
        self.cond.notify_all()

    def _purge(self) -> None:
        for job in [j for j in self.ready if j.cancelled.is_set()]:
            self._release(job)

    # ---- the thread --------------------------------------------------------------------------------------
    def _next(self):
        """The next job to build (waiting for one and for a free place), or None once stopped."""
        with self.cond:
            while True:
                self._purge()
                if self.stopped:
                    return None
                while self.queue and (self.queue[0].pixels.state != QUEUED or self.queue[0].cancelled.is_set()):
                    self.queue.popleft()  # taken by the worker, dropped or cancelled before its turn here
                if self.queue and self._held() < self.ahead:
                    job = self.queue.popleft()
                    job.pixels.state, self.building = BUILDING, job
                    return job
                self.cond.wait()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            self._build(job)
            job = None

    def _build(self, job) -> None:
        entry = job.pixels
        vision = error = None
        hit = False
        try:
            key = self.key(job)
            hit = key is not None and self.hit(key)
            if not hit:
                vision = self.build(job.images, lambda: self.stopped or entry.dropped or job.cancelled.is_set())
        except BaseException as exc:  # noqa: BLE001 - this job's error; the thread goes on
            error = classify(exc, stage="read")
        with self.cond:
            self.building = None
            if error is not None:
                entry.state, entry.error = FAILED, error
            elif entry.dropped or job.cancelled.is_set():
                entry.state = GONE
            elif hit:
                entry.state = SKIPPED
            elif vision is None:  # stopped halfway: the worker builds them
                entry.state = QUEUED
            else:
                entry.state, entry.vision = READY, vision
                job.images = []  # the pixels replace the source images (the key is already computed)
                self.ready.append(job)
                self.built += 1
            self.cond.notify_all()
