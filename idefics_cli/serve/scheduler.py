"""The scheduler: one worker thread owns the model; requests wait in a bounded queue in front of the decode loop.

Contract: `Scheduler(engine, cache, max_batch, max_queue, ahead, on_end)`: `start()`, `stop(cancel)`, `submit(job)`
(or `QueueFull`); the worker admits waiting jobs while rows are free, prefilled from the `PrefixCache` or encoded
(pixels built ahead, pixels.py). A `Job` reports on `events` (asyncio): ("start", None), ("delta", (text, entries)),
then ("done", entries) or ("error", IdeficsError); `entries`: new tokens' logprobs (None unless asked, or cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from bisect import bisect_right
from collections import deque

from ..runtime.decode import Loop, Row
from ..structured import row_grammar
from .cache import image_digest, prefix_key
from .pixels import Ahead

_UNKEYED = object()


class QueueFull(Exception):
    pass


class Job(Row):
    """One request's answer: a decode-loop row with its images, schema and event queue."""

    def __init__(self, ids: list[int], images: list, max_tokens: int, *, loop: asyncio.AbstractEventLoop | None = None,
                 schema=None, logprobs: bool = False, top_logprobs: int = 0, **sampling):
        """`sampling`: the `Row`'s temperature, top_p, seed and stop."""
        super().__init__(ids, max_tokens=max_tokens, top_n=top_logprobs, **sampling)
        self.want_logprobs, self._sent = logprobs, 0  # tokens whose logprobs were sent
        self.images = images
        self.schema = schema  # structured.Schema or None; its RowGrammar once admitted
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cached_tokens = 0
        self._scheduler: Scheduler | None = None
        self.pixels = None  # pixels.Entry while its pixels are built ahead
        self.cache_key = _UNKEYED  # prefix-cache key (None: no image prefix, or no cache), once computed
        self.digests: list[str] = []  # the images' cache.image_digest when known before

    def cancel(self) -> None:
        """Set `cancelled`; a queued job's built pixels go now, and the worker looks at it."""
        super().cancel()
        if (scheduler := self._scheduler) is not None:
            with scheduler.cond:
                scheduler.cond.notify()
            scheduler.pixels.drop(self)

    @property
    def shed(self) -> bool:
        """Cancelled because the server is stopping, not by its client."""
        return self.finish_reason == "cancelled" and self._scheduler.stopping

    def _emit(self, kind: str, payload=None) -> None:
        if self.loop is None:
            self.events.put_nowait((kind, payload))
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def on_start(self) -> None:
        self._emit("start")

    def on_text(self, piece: str) -> None:
        self._emit("delta", (piece, self._new_logprobs(bisect_right(self.ends, len(self.text)))))  # whole tokens

    def on_end(self) -> None:
        self.images = []
        key = {"stop": "answered", "length": "answered", "cancelled": "cancelled"}.get(self.finish_reason, "failed")
        self._scheduler.counts[key] += 1  # only the scheduler ends a job: submit set it
        if self._scheduler.on_end is not None:
            self._scheduler.on_end(self)
        if self.error is not None:
            self._emit("error", self.error)
        else:
            self._emit("done", self._new_logprobs(len(self.ends)) if self.finish_reason != "cancelled" else None)

    def _new_logprobs(self, upto: int) -> list[dict] | None:
        """The entries of the tokens not sent yet, up to `upto` (None without `logprobs`)."""
        if not self.want_logprobs:
            return None
        start, self._sent = self._sent, max(self._sent, upto)
        return self.logprob_content(start, upto)

    def logprob_content(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """OpenAI's `logprobs.content` entries of tokens start..stop (all: the whole answer)."""
        ends, text = self.token_ends(), self.text
        stop = min(len(ends), len(self.logprobs)) if stop is None else min(stop, len(self.logprobs))
        out = []
        for j in range(start, stop):
            token = text[ends[j - 1] if j else 0:ends[j]]
            top = [(token_text(self._scheduler.engine, i), v) for i, v in self.top[j]] if self.top_n else []
            out.append({"token": token, "logprob": self.logprobs[j], "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top
                                         if v > float("-inf")]})
        return out


class Scheduler:
    def __init__(self, engine, cache, max_batch: int = 4, max_queue: int = 16, ahead: int | None = None,
                 on_end=None):
        self.engine, self.cache, self.on_end = engine, cache, on_end  # on_end(job): each job's end (metrics.py)
        self.max_batch, self.max_queue = max(1, max_batch), max(0, max_queue)
        self.waiting: deque[Job] = deque()
        self.decode = Loop(engine)
        info = describe(engine)  # the model's settings, part of every prefix-cache key
        self.settings = "|".join(str(info[k]) for k in ("id", "revision", "quantization", "dtype", "device", "split"))
        self.cond = threading.Condition()
        self.stopping = self.cancelling = False  # cancelling: the worker cancels every job it holds
        self.thread: threading.Thread | None = None
        self.counts = {"answered": 0, "cancelled": 0, "failed": 0}  # for /health
        self._admitted: list[Job] = []  # taken from the queue this turn, not yet rows
        self.pixels = Ahead(self, self.max_batch if ahead is None else ahead)

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

    def busy(self) -> bool:
        with self.cond:
            return len(self.waiting) >= self.max_queue

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.decode.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "pixels_ahead": self.pixels.held(), **self.counts,
                    "steps": self.decode.steps, "cache": self.cache.stats()}

    def stop(self, cancel: bool = True, timeout: float | None = None) -> None:
        with self.cond:
            self.stopping, self.cancelling = True, self.cancelling or cancel
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        self.pixels.work.stop()  # it stops between two images
        self.pixels.work.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as exc:  # noqa: BLE001 - a bug: the jobs it holds fail with it, the worker goes on
                for job in self._admitted:
                    job.fail(exc)
                self._admitted = []
                self.decode.fail_all(exc)

    def _turn(self) -> bool:
        """Admit what fits, then one step; False once stopped."""
        self._sweep()
        with self.cond:
            while not (self.stopping or self.decode.rows or self.waiting):
                self.cond.wait()
            if self.stopping and not self.decode.rows and not self.waiting:
                self.pixels.work.stop()
                return False
            for job in [*self.waiting, *self.decode.rows] if self.cancelling else ():
                job.cancelled.set()
            free = min(len(self.waiting), self.max_batch - len(self.decode.rows))
            admit = self._admitted = [self.waiting.popleft() for _ in range(free)]
        ready = [job for job in admit if self._ready(job)]
        self.decode.add(ready)
        for job in ready:
            if job.prefix_kv is not None:
                self.cache.put(job.cache_key, job.prefix_kv)
                job.prefix_kv = None
        if self.decode.rows:
            self.decode.step()
        self._admitted = []
        return True

    def _sweep(self) -> None:
        """Waiting jobs that were cancelled or whose pixels failed end now: their places are free at once."""
        with self.cond:
            gone = [job for job in self.waiting if job.cancelled.is_set() or self.pixels.failed(job)]
            for job in gone:
                self.waiting.remove(job)  # a Job is equal only to itself
        for job in gone:
            self._ready(job)  # ends it (cancelled, or its error)

    def _ready(self, job: Job) -> bool:
        """Make a job a row the loop can prefill: its cached prefix, or its encoded images; False if it ended."""
        try:  # pixels built ahead (or None: built while encoding); take raises a build's error
            vision = None if job.cancelled.is_set() else self.pixels.take(job)
            if job.cancelled.is_set():  # before or while its pixels were being built
                self.pixels.drop(job)
                job.finish("cancelled")
                return False
            if job.schema is not None:
                job.grammar = row_grammar(self.engine, job.schema)
            key = self._key(job)
            cached = job.prefix if job.prefix is not None else self.cache.get(key) if key is not None else None
            if cached is not None:
                job.cached_tokens, job.prefix = cached.length, cached
            else:
                job.features = encode_images(self.engine, job.images, vision)
                job.keep_prefix = prefix_length(self.engine, job.ids) if key is not None else 0
            job.images = []
            return True
        except BaseException as exc:  # noqa: BLE001 - the worker survives every job
            job.fail(exc)
            return False

    def lookup(self, job: Job) -> bool:
        """Give a job its cached prefix now, if there is one (its images are then not needed); False if not."""
        key = self._key(job)
        cached = self.cache.get(key) if key is not None and self.cache.contains(key) else None
        if cached is None:
            return False
        job.cached_tokens, job.prefix, job.images = cached.length, cached, []
        return True

    def _key(self, job: Job) -> str | None:
        """The job's prefix-cache key (computed once: by the request's thread, the pixel thread, or here)."""
        if job.cache_key is _UNKEYED:
            length = prefix_length(self.engine, job.ids)
            job.cache_key = None
            if length and self.cache.max_bytes:
                digests = job.digests or [image_digest(image) for image in job.images]
                job.cache_key = prefix_key(self.settings, job.ids[:length], digests)
        return job.cache_key


def describe(engine) -> dict:
    """The /v1/models card (`render_side`: the px clients render PDF pages at, None: the documents' default)."""
    return {**engine.info, "split": engine.options.split, "render_side": engine.render_side,
            "doctags": engine.doctags}


def token_text(engine, token: int) -> str:
    """One token's text as it reads after other text (its leading space kept; cached): a top_logprobs entry."""
    texts = engine.__dict__.setdefault("_token_texts", {})
    if token not in texts:
        with engine.text_lock:
            tokenizer = engine.processor.tokenizer
            anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
            texts[token] = tokenizer.decode([anchor, token])[len(tokenizer.decode([anchor])):]
    return texts[token]


def prompt_ids(engine, messages: list[dict], images: list = ()) -> list[int]:
    """The template's ids, images expanded as `ask` does (`images` in order: their sizes decide a sized family's
    tokens). Text holding the image token itself (`<image>`) is a UsageError (engine.chat_text)."""
    processor = engine.processor
    with engine.text_lock:  # the tokenizer is shared with the decode loop's thread
        text = engine.chat_text(messages)
        if not engine.family.sized:
            return [int(t) for t in processor(text=[text]).input_ids[0]]
        kwargs = {"do_image_splitting": engine.options.split}
        grids = [tuple(processor.image_processor.get_number_of_image_patches(im.height, im.width, kwargs)[1:])
                 for im in images]
        text = engine.family.expand(processor, [text], grids)[0] if grids else text
        return [int(t) for t in processor.tokenizer(text).input_ids]


def prefix_length(engine, ids: list[int]) -> int:
    """Tokens up to the last image token."""
    image = engine.image_token_id
    return max((i for i, t in enumerate(ids) if t == image), default=-1) + 1


def encode_images(engine, images: list, vision=None):
    """Features of one prompt's images (or of `vision`, their pixels built ahead), or None without images."""
    from ..runtime.vision import VisionInputs

    if vision is None and not images:
        return None
    return engine.features({"vision": vision or VisionInputs([list(images)], engine.options.split)})[0]
