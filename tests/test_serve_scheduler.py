"""The server's scheduler and engine adapter in-process, on the real tiny model (float32, CPU): prefix cache, batching,
cancellation and the queue bound; no HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import make_image, prefill_one

from idefics_cli.interface import assistant_turn, user_turn
from idefics_cli.serve.cache import PrefixCache
from idefics_cli.serve.scheduler import Job, QueueFull, Scheduler, encode_images, prefix_length, prompt_ids


def run_jobs(scheduler, specs, on_delta=None, timeout: float = 300):
    """Submit [(messages, images, max_tokens)] at once; returns the finished jobs (TimeoutError past `timeout`)."""
    engine = scheduler.engine

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt_ids(engine, messages), list(images), max_tokens, loop=loop)
                for messages, images, max_tokens in specs]
        for job in jobs:
            scheduler.submit(job)

        async def drain(job):
            while True:
                kind, payload = await job.events.get()
                if kind == "delta" and on_delta is not None:
                    on_delta(job)
                if kind == "error":
                    raise payload
                if kind == "done":
                    return job

        return await asyncio.wait_for(asyncio.gather(*(drain(job) for job in jobs)), timeout)

    return asyncio.run(main())


PAGES = [make_image(320, 240, seed=1), make_image(240, 320, seed=2)]


def test_prefill_from_a_cached_prefix_gives_the_same_logits(sharp_engine):
    import torch

    ids = prompt_ids(sharp_engine, [user_turn(2, "What is the total?")])
    length = prefix_length(sharp_engine, ids)
    assert 0 < length < len(ids) and ids[length - 1] == sharp_engine.image_token_id
    full_logits, kv = prefill_one(sharp_engine, ids, encode_images(sharp_engine, PAGES))
    prefix = kv.head(length)
    kept = [k.clone() for k, _ in prefix.layers]
    again, kv2 = prefill_one(sharp_engine, ids, prefix=prefix)
    assert torch.allclose(full_logits, again, atol=1e-4)
    assert kv2.length == len(ids)
    assert all(torch.equal(a, k) for a, (k, _) in zip(kept, prefix.layers))  # the cached prefix is not written


def test_answers_with_a_cache_hit_equal_those_without(make_scheduler):
    cached, uncached = make_scheduler(), make_scheduler(cache_bytes=0)
    first = [([user_turn(2, "What is the total?")], PAGES, 8)]
    second = [([user_turn(2, "Who is the merchant?")], PAGES, 8)]
    (a1,) = run_jobs(cached, first)
    assert a1.cached_tokens == 0
    (hit,) = run_jobs(cached, second)
    (miss,) = run_jobs(uncached, second)
    assert hit.cached_tokens > 0 and miss.cached_tokens == 0
    assert hit.token_ids == miss.token_ids and hit.text == miss.text
    assert cached.cache.hits == 1 and uncached.cache.stats()["entries"] == 0
    # the conversation's next turn: the first turn's image prefix is reused, answers unchanged
    turn2 = [([user_turn(2, "What is the total?"), assistant_turn(a1.text), user_turn(0, "Are you sure?")],
              PAGES, 8)]
    (hit2,) = run_jobs(cached, turn2)
    (miss2,) = run_jobs(uncached, turn2)
    assert hit2.cached_tokens > 0 and hit2.token_ids == miss2.token_ids


def test_batched_rows_answer_as_they_do_alone(make_scheduler):
    specs = [([user_turn(1, "What is the total?")], PAGES[:1], 8),
             ([user_turn(2, "Describe both pages in detail, please.")], PAGES, 6),
             ([user_turn(0, "Hello there")], [], 8)]
    alone = [run_jobs(make_scheduler(cache_bytes=0, max_batch=1), [spec])[0].token_ids for spec in specs]
    batch = make_scheduler(cache_bytes=0, max_batch=3)
    together = run_jobs(batch, specs)
    assert [job.token_ids for job in together] == alone
    assert batch.counts["answered"] == 3


def test_a_cancelled_job_frees_its_row(make_scheduler):
    scheduler = make_scheduler(max_batch=1)
    cancelled = threading.Event()

    def cancel_first(job):
        if job.max_tokens == 2000 and not cancelled.is_set():
            cancelled.set()
            job.cancel()

    long, short = run_jobs(scheduler, [([user_turn(1, "Go on")], PAGES[:1], 2000),
                                       ([user_turn(1, "What is the total?")], PAGES[:1], 8)], cancel_first)
    assert long.finish_reason == "cancelled" and len(long.token_ids) < 2000
    assert short.finish_reason in ("stop", "length")
    assert scheduler.counts["cancelled"] == 1
    for _ in range(100):  # the last row leaves the batch right after its last token is sent
        if scheduler.load()["running"] == 0:
            break
        time.sleep(0.05)
    assert scheduler.load()["running"] == 0


def test_the_queue_is_bounded(make_scheduler):
    scheduler = make_scheduler(max_queue=1, start=False)
    scheduler.submit(Job([1, 2], [], 4))
    assert scheduler.busy()
    with pytest.raises(QueueFull):
        scheduler.submit(Job([1, 2], [], 4))


def test_the_lru_is_bounded_by_bytes():
    class Blob:
        def __init__(self, n):
            self.nbytes = n

    cache = PrefixCache(100)
    for key in "abc":
        assert cache.put(key, Blob(40))
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 80
    assert cache.get("b") is not None  # b is now the most recent: d evicts c
    cache.put("d", Blob(40))
    assert list(cache.entries) == ["b", "d"]
    assert not cache.put("huge", Blob(101)) and cache.get("a") is None
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_stopping_cancels_what_is_in_flight(make_scheduler):
    scheduler = make_scheduler(max_batch=1)
    started = threading.Event()
    result = {}

    def run():
        try:
            result["jobs"] = run_jobs(scheduler, [([user_turn(0, "Go on")], [], 2000),
                                                  ([user_turn(0, "Hi")], [], 8)], lambda job: started.set())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)  # its first token: sent while it joins the batch (a stop must cancel it then too)
    scheduler.stop(cancel=True, timeout=60)  # what the server does once --grace has run out
    thread.join(60)
    assert "jobs" in result, result
    running, waiting = result["jobs"]
    assert running.finish_reason == "cancelled" and len(running.token_ids) < 2000
    assert waiting.finish_reason == "cancelled" and waiting.token_ids == []
    assert not scheduler.thread.is_alive()


def test_a_full_queue_is_a_503_with_retry_after(sharp_engine):
    from fastapi.testclient import TestClient

    from idefics_cli.serve.app import ServerState, build_app
    from idefics_cli.serve.config import ServeConfig

    scheduler = Scheduler(sharp_engine, PrefixCache(0), max_batch=1, max_queue=1)  # not started: nothing leaves
    scheduler.submit(Job([1, 2], [], 4))
    state = ServerState(engine=sharp_engine, scheduler=scheduler, status="ok", model_id="m")
    r = TestClient(build_app(ServeConfig(), state)).post("/v1/chat/completions",
                                                          json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"


def test_an_unexpected_error_fails_the_jobs_it_held_and_the_worker_goes_on(make_scheduler):
    """Not a dead worker thread with every later request hanging while /health says ok."""
    scheduler = make_scheduler()
    put, calls = scheduler.cache.put, []

    def broken_put(key, kv):
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("a bug in the worker")
        return put(key, kv)

    scheduler.cache.put = broken_put
    spec = ([user_turn(1, "What is the total?")], PAGES[:1], 3)
    with pytest.raises(Exception, match="a bug in the worker"):
        run_jobs(scheduler, [spec], timeout=60)
    (job,) = run_jobs(scheduler, [spec], timeout=60)  # the next request is answered
    assert job.finish_reason == "length" and len(calls) == 2
    assert scheduler.thread.is_alive() and scheduler.counts["failed"] == 1
