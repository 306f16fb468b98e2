"""Pixels ahead of the worker (serve/pixels.py) in the in-process scheduler, on the real tiny model (float32, CPU):
the same answers, pixels built in the pixel thread, none for a cached prefix, a failed build failing only its job,
the bounded look-ahead, cancellation and stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import make_image

from idefics_cli.interface import user_turn
from idefics_cli.runtime.vision import VisionInputs
from idefics_cli.serve import pixels
from idefics_cli.serve.scheduler import Job, prompt_ids

PAGES = [make_image(320, 240, seed=1), make_image(240, 320, seed=2)]


@pytest.fixture
def builders(monkeypatch):
    """The name of the thread that built each source image's pixels (VisionInputs.build_one, run for real)."""
    names: list[str] = []
    build_one = VisionInputs.build_one

    def recording(self, image_processor):
        names.append(threading.current_thread().name)
        return build_one(self, image_processor)

    monkeypatch.setattr(VisionInputs, "build_one", recording)
    return names


def run_jobs(scheduler, specs) -> list[tuple[Job, str, object]]:
    """Submit [(question, images, max_tokens)] at once; returns (job, last event kind, its payload) for each."""
    engine = scheduler.engine

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt_ids(engine, [user_turn(len(images), question)]), list(images), n, loop=loop)
                for question, images, n in specs]
        for job in jobs:
            scheduler.submit(job)

        async def drain(job):
            while True:
                kind, payload = await job.events.get()
                if kind in ("done", "error"):
                    return job, kind, payload

        return await asyncio.gather(*(drain(job) for job in jobs))

    return asyncio.run(main())


SPECS = [("What is the total?", PAGES[:1], 8), ("Describe both pages.", PAGES, 6),
         ("Hello there", [], 8), ("Who is the merchant?", PAGES[1:], 8), ("And the date?", PAGES[::-1], 7)]
SOURCES = sum(len(images) for _, images, _ in SPECS)


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def test_answers_with_pixels_built_ahead_equal_those_built_by_the_worker(make_scheduler, builders):
    # no pixel thread: the worker builds each job's pixels while encoding
    inline = make_scheduler(cache_bytes=0, max_batch=2, ahead=0)
    before = [job.token_ids for job, kind, _ in run_jobs(inline, SPECS) if kind == "done"]
    assert len(before) == len(SPECS) and set(builders) == {"idefics-serve"} and len(builders) == SOURCES
    builders.clear()
    # 2 rows, 2 jobs' pixels ahead: later jobs' pixels are built while others decode
    ahead = make_scheduler(cache_bytes=0, max_batch=2)
    after = run_jobs(ahead, SPECS)
    assert [job.token_ids for job, _, _ in after] == before
    assert set(builders) == {pixels.THREAD} and len(builders) == SOURCES  # never on the worker's thread
    assert ahead.pixels.built == 4 and ahead.counts["answered"] == len(SPECS)
    assert all(job.pixels.state == pixels.GONE and job.pixels.vision is None for job, _, _ in after if job.pixels)
    assert ahead.load()["pixels_ahead"] == 0


def test_a_cached_prefix_builds_no_pixels(make_scheduler, builders):
    scheduler = make_scheduler(cache_bytes=2**30, max_batch=2)
    ((first, _, _),) = run_jobs(scheduler, [("What is the total?", PAGES, 8)])
    assert len(builders) == len(PAGES) and first.cached_tokens == 0
    ((hit, kind, _),) = run_jobs(scheduler, [("Who is the merchant?", PAGES, 8)])
    assert kind == "done" and hit.cached_tokens > 0
    assert len(builders) == len(PAGES) and scheduler.pixels.built == 1  # the hit's pixels were never built
    assert scheduler.cache.hits == 1


def test_a_job_whose_pixels_fail_gets_its_error_and_the_others_go_on(make_scheduler, builders):
    from PIL import Image

    broken = Image.new("RGB", (0, 0))  # decodes, hashes, and makes the image processor divide by zero
    scheduler = make_scheduler(cache_bytes=0, max_batch=1)
    results = run_jobs(scheduler, [("What is the total?", PAGES[:1], 8), ("What is this?", [broken], 8),
                                   ("Who is the merchant?", PAGES[1:], 8)])
    (good1, k1, _), (bad, kind, err), (good2, k2, _) = results
    assert kind == "error" and err.code == "corrupt" and bad.finish_reason == "error"
    assert k1 == k2 == "done" and good1.token_ids and good2.token_ids
    assert set(builders) == {pixels.THREAD}
    assert scheduler.counts["failed"] == 1 and scheduler.counts["answered"] == 2
    assert scheduler.thread.is_alive() and scheduler.pixels.work.alive()


def test_the_look_ahead_is_bounded_and_a_cancelled_job_frees_its_place(make_scheduler, builders):
    scheduler = make_scheduler(cache_bytes=0, max_batch=1, ahead=2, start=False)
    scheduler.pixels.start()  # the pixel thread alone: nothing takes the pixels it builds
    ahead = scheduler.pixels
    jobs = [Job(prompt_ids(scheduler.engine, [user_turn(1, f"Question {k}?")]), [PAGES[k % 2]], 4)
            for k in range(4)]
    for job in jobs:
        scheduler.submit(job)
    # two jobs built and none being built: the thread cannot start a third until one is taken or dropped
    wait_for(lambda: ahead.held() == 2 and ahead.building is None, "two jobs' pixels built")
    assert [job.pixels.state for job in jobs] == [pixels.READY, pixels.READY, pixels.QUEUED, pixels.QUEUED]
    assert ahead.built == 2 and len(builders) == 2 and jobs[0].images == [] and jobs[2].images
    jobs[0].cancel()  # the client went away: its pixels go at once, and the third job's are built
    assert jobs[0].pixels.vision is None and jobs[0].pixels.state == pixels.GONE
    wait_for(lambda: jobs[2].pixels.state == pixels.READY and ahead.building is None, "the third job built")
    assert ahead.held() == 2 and jobs[3].pixels.state == pixels.QUEUED and ahead.built == 3
    scheduler.stop(cancel=True, timeout=30)  # ends the pixel thread
    assert not ahead.work.alive()
    assert jobs[3].pixels.state == pixels.QUEUED and len(builders) == 3


def test_stopping_ends_the_pixel_thread_and_what_waits(make_scheduler):
    scheduler = make_scheduler(cache_bytes=0, max_batch=1)
    result = {}

    def run():
        result["jobs"] = run_jobs(scheduler, [("Go on", PAGES[:1], 2000), ("Hi", PAGES[1:], 8)])

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: scheduler.load()["running"] == 1, "the first job decoding")
    scheduler.stop(cancel=True, timeout=60)
    thread.join(60)
    (running, k1, _), (waiting, k2, _) = result["jobs"]
    assert k1 == k2 == "done" and running.finish_reason == waiting.finish_reason == "cancelled"
    assert not scheduler.thread.is_alive() and not scheduler.pixels.work.alive()
    assert scheduler.pixels.held() == 0
