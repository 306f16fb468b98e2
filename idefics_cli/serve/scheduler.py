"""The scheduler: one worker thread owns the model; requests wait in a bounded queue and decode as rows of one batch.

Contract:
- `Scheduler(engine, cache, max_batch, max_queue, ahead)`; `start()` runs the worker and the pixel thread,
  `stop(cancel)` ends both (with `cancel`, every waiting and running job ends as `cancelled`).
- `submit(job)` queues a `Job` (a tokenized prompt, its rendered images and its sampling settings) or raises
  `QueueFull` when `max_queue` jobs already wait. The worker admits waiting jobs whenever rows are free (up to
  `max_batch`): it prefills each (the image prefix's key/value cache from the `PrefixCache` when the same
  prefix was seen, else encoded and stored), then advances all rows one token a step in one forward pass.
  A row that ends (end of utterance, a stop string, max tokens) or whose job is cancelled (`Job.cancel()`,
  e.g. the client went away) leaves the batch before the next step, so its place is free for a waiting job at
  once (continuous batching: rows join and leave between steps).
- Pixels ahead (pixels.py): a queued job's pixels (the image processor's numpy work) and its prefix key (the
  images' hashes) are made in a background thread, in queue order, at most `ahead` jobs (default `max_batch`)
  ahead of the worker, so the worker only runs the vision tower (none for a predicted cache hit). A waiting
  job whose pixels failed to build (its error: `corrupt`, or `out_of_memory`) or that was cancelled ends
  before the next decode step, freeing its places in the queue and ahead; the others go on.
- A job reports through `Job.events` (an asyncio queue on the caller's loop): ("start", None) once prefilled,
  ("delta", text) for each new piece of the answer, then ("done", None) or ("error", IdeficsError). Greedy
  by default (argmax, the generation config's single-token bad words masked, as `generate` does); with a
  temperature, softmax sampling with top-p from a generator seeded by `seed`. Text is decoded from all answer
  tokens so far and emitted only when it is stable (no partial UTF-8 character, no possible start of a stop
  string); a stop string ends the answer before it.
- A job with a `schema` (`response_format`) gets its own grammar state when it is admitted: at every step,
  its row of the logits is masked to the tokens its grammar allows (before the argmax or the sampling; rows
  without a schema are left alone), and the token it takes moves its grammar on.
- The worker never dies of a job: an exception fails the jobs it touched (`errors.classify`) and it goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from ..errors import IdeficsError, classify
from . import backend
from .cache import image_hash, prefix_key
from .pixels import Ahead

_UNKEYED = object()


class QueueFull(Exception):
    pass


class Job:
    def __init__(self, ids: list[int], images: list, max_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, schema=None):
        self.ids, self.images, self.max_tokens = ids, images, max_tokens
        self.schema = schema  # structured.Schema or None
        self.grammar = None  # its RowGrammar once admitted
        self.temperature, self.top_p, self.seed, self.stop = temperature, top_p, seed, list(stop or [])
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.answer_ids: list[int] = []
        self.text = ""
        self.emitted = ""
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.generator = None
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        self._scheduler: Scheduler | None = None
        self.pixels = None  # pixels.Entry while its pixels are built ahead
        self.cache_key = _UNKEYED  # prefix-cache key (None: no image prefix, or no cache), once computed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled.set()
        if self._scheduler is not None:
            self._scheduler.wake()

    def _emit(self, kind: str, payload=None) -> None:
        if self.loop is None:
            self.events.put_nowait((kind, payload))
        else:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

    def fail(self, err: IdeficsError) -> None:
        if not self.done:
            self.finish(None, err)

    def finish(self, reason: str | None, err: IdeficsError | None = None) -> None:
        """End the job: `reason` stop, length or cancelled; or an error."""
        self.finish_reason = reason or "error"
        if self._scheduler is not None:
            key = {"stop": "answered", "length": "answered", "cancelled": "cancelled"}.get(self.finish_reason, "failed")
            self._scheduler.counts[key] += 1
        self._emit("error", err) if err is not None else self._emit("done")


class Scheduler:
    def __init__(self, engine, cache, max_batch: int = 4, max_queue: int = 16, ahead: int | None = None):
        self.engine, self.cache = engine, cache
        self.max_batch, self.max_queue = max(1, max_batch), max(0, max_queue)
        self.waiting: deque[Job] = deque()
        self.rows: list[Job] = []
        self.admitting: list[Job] = []
        self.batch = backend.Batch(engine)
        self.settings = backend.settings_key(engine)
        self.eos = backend.eos_ids(engine)
        self.suppressed = backend.suppressed_ids(engine)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.counts = {"answered": 0, "cancelled": 0, "failed": 0, "steps": 0}  # for /health
        self.pixels = Ahead(lambda images, stop: backend.build_pixels(engine, images, stop), self._key,
                            cache.contains, self.max_batch if ahead is None else ahead)

    # ---- the callers' side ---------------------------------------------------------------------
    def start(self) -> None:
        self.pixels.start()
        self.thread = threading.Thread(target=self._run, name="idefics-serve", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            job._scheduler = self
            self.waiting.append(job)
            self.pixels.add(job)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()
        self.pixels.wake()

    def busy(self) -> bool:
        with self.cond:
            return len(self.waiting) >= self.max_queue

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "pixels_ahead": self.pixels.held(), **self.counts}

    def stop(self, cancel: bool = True, timeout: float | None = None) -> None:
        with self.cond:
            self.stopping = True
            if cancel:
                for job in [*self.waiting, *self.admitting, *self.rows]:
                    job.cancelled.set()
            self.cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.thread is not None:
            self.thread.join(timeout)
        self.pixels.stop()
        self.pixels.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ---- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._sweep()
            with self.cond:
                while not self.stopping and not self.rows and not self._admissible():
                    self.cond.wait()
                if self.stopping and not self.rows and not self.waiting:
                    self.pixels.stop()
                    return
                admit = self.admitting = []  # between the queue and the batch: stop() must still see them
                while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            for job in admit:
                self._admit(job)
            with self.cond:
                self.admitting = []
            self._retire()
            if self.rows:
                self._step()
                self._retire()

    def _admissible(self) -> bool:
        return bool(self.waiting) and len(self.rows) < self.max_batch

    def _sweep(self) -> None:
        """Waiting jobs that were cancelled or whose pixels failed end now: their places are free at once."""
        with self.cond:
            gone = [job for job in self.waiting if job.cancelled.is_set() or self.pixels.failed(job)]
            if gone:
                self.waiting = deque(job for job in self.waiting if not any(job is g for g in gone))
        for job in gone:
            self._admit(job)  # ends it (cancelled, or its error) without touching the batch

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.pixels.drop(job)
            job.finish("cancelled")
            return
        try:
            vision = self.pixels.take(job)  # built ahead (or None: built while encoding); raises a build's error
            if job.cancelled.is_set():  # cancelled while its pixels were being built
                job.finish("cancelled")
                return
            if job.schema is not None:
                job.grammar = backend.row_grammar(self.engine, job.schema)
            logits, kv = self._prefill(job, vision)
            vision = None
            job.images = []
            token = self._choose(logits[None], [job])[0]
            job._emit("start")
            self._accept(job, token)
            if not job.done:
                with self.cond:
                    try:
                        self.batch.add(kv)
                    except BaseException as exc:  # e.g. out of memory halfway: the batch is no longer whole
                        for row in self.rows:
                            row.fail(classify(exc))
                        raise
                    self.rows.append(job)
        except BaseException as exc:  # noqa: BLE001 - the worker survives every job
            job.fail(classify(exc))

    def _key(self, job: Job) -> str | None:
        """The job's prefix-cache key (computed once: by the pixel thread, or here)."""
        if job.cache_key is _UNKEYED:
            length = backend.prefix_length(self.engine, job.ids)
            job.cache_key = (prefix_key(self.settings, job.ids[:length], [image_hash(im) for im in job.images])
                             if length and self.cache.max_bytes else None)
        return job.cache_key

    def _prefill(self, job: Job, vision=None):
        engine = self.engine
        key = self._key(job)
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            job.cached_tokens = cached.length
            return backend.prefill(engine, job.ids, prefix=cached)
        logits, kv = backend.prefill(engine, job.ids, backend.encode_images(engine, job.images, vision))
        if key is not None:
            self.cache.put(key, kv.head(backend.prefix_length(engine, job.ids)))
        return logits, kv

    def _step(self) -> None:
        rows = list(self.rows)
        try:
            logits = self.batch.step([job.token_ids[-1] for job in rows])
            tokens = self._choose(logits, rows)
        except BaseException as exc:  # noqa: BLE001
            err = classify(exc)
            for job in rows:
                job.fail(err)
            return
        self.counts["steps"] += 1
        for job, token in zip(rows, tokens):
            try:
                self._accept(job, token)
            except BaseException as exc:  # noqa: BLE001
                job.fail(classify(exc))

    def _retire(self) -> None:
        """Rows whose job ended or was cancelled leave the batch (their cache rows are dropped)."""
        with self.cond:
            for job in self.rows:
                if job.cancelled.is_set() and not job.done:
                    job.finish("cancelled")
            keep = [i for i, job in enumerate(self.rows) if not job.done]
            if len(keep) < len(self.rows):
                self.batch.keep(keep)
                self.rows = [self.rows[i] for i in keep]

    def _choose(self, logits, jobs: list[Job]) -> list[int]:
        import torch

        with torch.inference_mode():  # the logits are inference tensors: masking them in place needs the mode
            return self._choose_rows(logits, jobs)

    def _choose_rows(self, logits, jobs: list[Job]) -> list[int]:
        import torch

        if self.suppressed:
            logits[:, self.suppressed] = float("-inf")
        if any(job.grammar is not None for job in jobs):
            backend.constrain(logits, [job.grammar for job in jobs])
        out = []
        for row, job in zip(logits, jobs):
            if not job.temperature:
                out.append(int(row.argmax()))
                continue
            if job.generator is None:
                job.generator = torch.Generator(device="cpu")
                job.generator.manual_seed(job.seed if job.seed is not None else int(torch.seed()))
            probs = torch.softmax(row.cpu() / job.temperature, dim=-1)
            if job.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                drop = sorted_probs.cumsum(0) - sorted_probs > job.top_p
                sorted_probs[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            out.append(int(torch.multinomial(probs, 1, generator=job.generator)))
        return out

    def _accept(self, job: Job, token: int) -> None:
        """One new token of a job: update its text, emit what is stable, decide whether it has ended."""
        if job.first_token_s is None:
            job.first_token_s = time.perf_counter() - job.submitted
        if job.grammar is not None:
            job.grammar.accept(token)
        job.token_ids.append(token)
        ended = None
        if token in self.eos:
            ended = "stop"
        else:
            job.answer_ids.append(token)
            job.text = backend.decode(self.engine, job.answer_ids)
        text = job.text
        for s in job.stop:
            at = text.find(s)
            if at >= 0:
                text, ended = text[:at], "stop"
        if ended is None and len(job.token_ids) >= job.max_tokens:
            ended = "length"
        if ended is None:
            if text.endswith("\ufffd"):
                return
            hold = max((len(s) - 1 for s in job.stop), default=0)
            text = text[: len(text) - hold] if hold else text
        else:
            job.text = text
        if len(text) > len(job.emitted) and text.startswith(job.emitted):
            job._emit("delta", text[len(job.emitted):])
            job.emitted = text
        if ended is not None:
            job.finish(ended)
