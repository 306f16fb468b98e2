"""Pixels ahead of the worker: queued jobs' pixels built in one background thread, in queue order.

Contract: `Ahead(scheduler, ahead)` (a job whose prefix the scheduler's cache holds needs none): `add(job)` queues
a job, `start()` runs the thread, `work.stop()` ends it; at most `ahead` jobs hold a place (being built, or built
and not taken). `take(job)` (the worker) waits for pixels that are coming
and returns them, None (build them yourself), or raises the build's error; `drop(job)` frees them. `failed`, `held()`.
"""

from __future__ import annotations

from collections import deque

from ..ahead import WorkAhead
from ..errors import classify

THREAD = "idefics-pixels"
QUEUED, BUILDING, READY, FAILED, GONE = "queued", "building", "ready", "failed", "gone"


class Entry:
    """One job's pixels: its state, the built `VisionInputs` (READY) or the build's error (FAILED)."""

    __slots__ = ("state", "vision", "error")

    def __init__(self):
        self.state, self.vision, self.error = QUEUED, None, None


class Ahead:
    def __init__(self, scheduler, ahead: int):
        self.scheduler, self.ahead = scheduler, max(0, ahead)
        self.work = WorkAhead(THREAD, places=self.ahead)  # a place: a job being built, or built and not taken
        self.cond = self.work.cond
        self.queue: deque = deque()  # jobs not yet looked at by the thread, in queue order
        self.building = None  # the job whose pixels are being built
        self.built = 0  # jobs whose pixels the thread built

    def held(self) -> int:
        """Jobs holding a place now: built and not taken, or being built."""
        with self.cond:
            return self.work.held

    # ---- the callers' side (submit, cancel, the worker) ---------------------------------------------------
    def add(self, job) -> None:
        if not job.images or self.ahead < 1:
            return
        with self.cond:
            job.pixels = Entry()
            self.queue.append(job)
            self.cond.notify_all()

    def start(self) -> None:
        if self.ahead >= 1:
            self.work.start(self._run)

    def failed(self, job) -> bool:
        return job.pixels is not None and job.pixels.state == FAILED

    def drop(self, job) -> None:
        """The job was cancelled: its built pixels go now (a build stops between two images and keeps nothing)."""
        if job.pixels is not None:
            with self.cond:
                if job.pixels.state != BUILDING:
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
        running = self.work.alive() and not self.work.stopped
        return running and self.work.held < self.ahead and any(j is job for j in self.queue)

    def _release(self, job) -> None:
        entry = job.pixels
        if entry.state == READY:  # built pixels hold a place until taken
            self.work.release()
        entry.vision = None
        entry.state = GONE if entry.state != FAILED else FAILED
        self.cond.notify_all()

    # ---- the thread --------------------------------------------------------------------------------------
    def _pick(self):
        """Under `cond`: the next queued job to build (it holds a place from now), or None."""
        while self.queue and (self.queue[0].pixels.state != QUEUED or self.queue[0].cancelled.is_set()):
            self.queue.popleft()  # taken by the worker, dropped or cancelled before its turn here
        if not self.queue:
            return None
        job = self.queue.popleft()
        job.pixels.state, self.building = BUILDING, job
        return job

    def _run(self, work: WorkAhead) -> None:
        while (job := work.claim(self._pick)) is not None:
            self._build(job)
            job = None

    def _build(self, job) -> None:
        """The job's pixels (numpy only), one source image at a time, stopping between two when asked to."""
        from ..runtime.vision import VisionInputs

        entry, scheduler = job.pixels, self.scheduler
        vision = error = None
        hit = False
        try:
            key = scheduler._key(job)
            hit = key is not None and scheduler.cache.contains(key)
            if not hit:
                vision = VisionInputs([list(job.images)], scheduler.engine.options.split)
                while vision.next < len(vision.sources) and not (self.work.stopped or job.cancelled.is_set()):
                    vision.build_one(scheduler.engine.processor.image_processor)
                vision = vision if vision.next == len(vision.sources) else None
        except BaseException as exc:  # noqa: BLE001 - this job's error; the thread goes on
            error = classify(exc, stage="read")
        with self.cond:
            self.building = None
            if error is not None:
                entry.state, entry.error = FAILED, error
            elif job.cancelled.is_set() or hit:  # a hit needs no pixels
                entry.state = GONE
            elif vision is None:  # stopped halfway: the worker builds them
                entry.state = QUEUED
            else:
                entry.state, entry.vision = READY, vision
                job.images = []  # the pixels replace the source images (the key is already computed)
                self.built += 1
            if entry.state != READY:
                self.work.release()  # only built pixels keep their place
            self.cond.notify_all()
