"""ahead.py: one background thread working ahead of a consumer, bounded, ordered, cancellable; `in_thread`."""

from __future__ import annotations

import threading
import time

import pytest

from idefics_cli.ahead import WorkAhead, in_thread


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_items_arrive_in_order_then_the_end():
    work = WorkAhead("test-ahead", depth=3).start(lambda w: all(w.put(k) for k in range(50)))
    assert list(work) == list(range(50))
    work.join(5)
    assert not work.alive()


def test_put_waits_while_depth_items_wait_untaken():
    produced = []

    def produce(w):
        for k in range(10):
            if not w.put(k):
                return
            produced.append(k)

    work = WorkAhead("test-ahead", depth=2).start(produce)
    wait_until(lambda: len(produced) == 2)
    time.sleep(0.1)
    assert produced == [0, 1]  # the third waits until one is taken
    items = iter(work)
    assert next(items) == 0
    wait_until(lambda: len(produced) == 3)
    time.sleep(0.05)
    assert produced == [0, 1, 2]
    assert list(items) == list(range(1, 10))


def test_claim_holds_a_place_until_it_is_released():
    started = []

    def produce(w):
        for k in range(4):
            if w.claim() is None:
                return
            started.append(k)
            w.put(k)

    work = WorkAhead("test-ahead", depth=4, places=2).start(produce)
    wait_until(lambda: len(started) == 2)
    time.sleep(0.1)
    assert started == [0, 1] and work.held == 2  # both places held: work 2 waits
    items = iter(work)
    assert next(items) == 0
    time.sleep(0.05)
    assert started == [0, 1]  # taking an item frees no place: only release() does
    work.release()
    wait_until(lambda: len(started) == 3)
    assert work.held == 2


def test_claim_waits_for_pick_and_returns_what_it_picked():
    queue = []
    got = []

    def produce(w):
        while (job := w.claim(lambda: queue.pop(0) if queue else None)) is not None:
            got.append(job)
            w.release()

    work = WorkAhead("test-ahead", places=1).start(produce)
    time.sleep(0.05)
    with work.cond:
        queue.extend(["a", "b"])
        work.cond.notify_all()
    wait_until(lambda: got == ["a", "b"])
    work.stop()
    work.join(5)
    assert not work.alive() and list(work) == []


def test_stop_cancels_a_waiting_producer_and_ends_the_consumer():
    returned = threading.Event()
    results = []

    def produce(w):
        for k in range(100):
            results.append(w.put(k))
            if not results[-1]:
                break
        returned.set()

    work = WorkAhead("test-ahead", depth=1).start(produce)
    items = iter(work)
    assert next(items) == 0
    wait_until(lambda: len(results) == 2)  # the second put waits: depth 1
    work.stop()
    assert returned.wait(5) and results[-1] is False  # put returned False: the producer left
    assert work.claim() is None and work.put("late") is False
    work.join(5)
    assert not work.alive()


def test_an_error_reaches_the_consumer_after_the_items_before_it():
    def produce(w):
        w.put("first")
        w.put("second")
        raise ValueError("broken page")

    work = WorkAhead("test-ahead", depth=4).start(produce)
    items = iter(work)
    assert [next(items), next(items)] == ["first", "second"]
    with pytest.raises(ValueError, match="broken page"):
        next(items)


def test_an_exception_object_is_an_item_like_any_other():
    err = KeyError("data")
    work = WorkAhead("test-ahead").start(lambda w: w.put(err))
    assert list(work) == [err]


def test_start_runs_one_thread_once():
    calls = []
    work = WorkAhead("test-ahead-once")
    assert work.thread is None
    work.start(lambda w: calls.append(threading.current_thread().name))
    work.start(lambda w: calls.append("again"))
    assert list(work) == [] and calls == ["test-ahead-once"]


def test_in_thread_hands_back_a_value_or_an_error_as_a_future():
    names = []
    future = in_thread(lambda: names.append(threading.current_thread().name) or 42, name="test-one")
    assert future.result(5) == 42 and names == ["test-one"]
    failed = in_thread(lambda: 1 / 0, name="test-one")
    assert isinstance(failed.exception(5), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        failed.result()


def test_in_thread_is_a_daemon_that_a_waiting_caller_can_leave():
    from concurrent.futures import TimeoutError as NoAnswer

    release = threading.Event()
    future = in_thread(release.wait, name="test-hung")
    with pytest.raises(NoAnswer):
        future.result(0.05)
    assert [t for t in threading.enumerate() if t.name == "test-hung"][0].daemon
    release.set()
    assert future.result(5) is True
