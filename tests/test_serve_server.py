"""server.py over real HTTP: a full queue answers 503 with Retry-After; SIGTERM past --grace cancels, answers what
was in flight 503 `shutting_down` and exits 0.

One server (127.0.0.1, ephemeral port; the tiny model, float32 CPU) with two rows and one waiting place
(`--max-batch 2 --max-queue 1`), a one-second `--grace` and a stream's `: ping` every PING_S; long answers
(thousands of tokens) keep it busy. The SIGTERM test is the module's last: it ends the server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import make_image

httpx = pytest.importorskip("httpx")
from test_serve import Server, data_url, image_message  # noqa: E402 - after the skip: the serve extra

LONG = 4000  # tokens: an answer that outlives every step of these tests (the tiny model never stops by itself)
PING_S = 0.2  # IDEFICS_SSE_PING_S: how long a stream may send nothing before its `: ping`


@pytest.fixture(scope="module")
def server(sharp_model):
    srv = Server(sharp_model, "--max-batch", "2", "--max-queue", "1", "--grace", "1",
                 env={"IDEFICS_SSE_PING_S": str(PING_S)})
    try:
        yield srv.wait_ready()
    finally:
        if srv.proc.poll() is None:  # a test failed before SIGTERM ended it
            srv.proc.kill()
            srv.proc.wait(30)


@pytest.fixture(scope="module")
def messages():
    return [image_message(data_url(make_image(96, 64, seed=4)), "What is this?")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-server") / "page.png"
    make_image(96, 64, seed=4).save(path)
    return str(path)


def wait_for(server, **want) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if all(health[k] == v for k, v in want.items()):
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server never reached {want}: {server.health()}")


def take_rows(server, messages) -> list:
    """Two long streams holding both rows; one at a time, as the second, sent while the first still waits for the
    worker (a loaded machine), would find the one waiting place taken and be refused."""
    running = []
    for n in (1, 2):
        running.append(Streaming(server, messages))
        wait_for(server, running=n)
    return running


class Streaming:
    """A streamed chat completion held open in a thread until `close()`."""

    def __init__(self, server, messages, max_tokens: int = LONG):
        self.client = httpx.Client(timeout=120)
        self.status = None
        self.lines: list[str] = []
        self.stop = threading.Event()
        body = {"messages": messages, "stream": True, "max_tokens": max_tokens}
        self.thread = threading.Thread(target=self._run, args=(server.url, body), daemon=True)
        self.thread.start()

    def _run(self, url, body):
        try:
            with self.client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
                    if self.stop.is_set():
                        break
        except httpx.HTTPError:
            pass

    def close(self):
        self.stop.set()  # the thread hangs up at the stream's next line
        self.thread.join(60)
        self.client.close()


def test_a_full_queue_answers_503_with_retry_after_and_the_cli_waits_its_turn(server, messages, page):
    running = take_rows(server, messages)
    waiting = Streaming(server, messages)  # takes the one waiting place
    wait_for(server, running=2, waiting=1)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=30)
    assert r.status_code == 503, r.text
    assert float(r.headers["Retry-After"]) > 0
    error = r.json()["error"]
    assert error["code"] == "overloaded" and error["type"] and error["message"] and "param" in error
    # `idefics ask --server` meanwhile is refused, retries after Retry-After, and is answered once there is room
    client = subprocess.Popen([sys.executable, "-m", "idefics_cli", "ask", page, "What is this?", "--server",
                               server.url, "--max-new-tokens", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(line.startswith("POST /v1/chat/completions 503") for line in server.lines) < 2:
        assert time.monotonic() < deadline and client.poll() is None, server.lines
        time.sleep(0.05)
    for stream in running:
        stream.close()
    while not any(line.startswith("data:") for line in waiting.lines):  # its turn (it had 200 and pings before)
        assert time.monotonic() < deadline, waiting.lines[-5:]
        time.sleep(0.05)
    waiting.close()  # all were answered (200) before hanging up
    assert [stream.status for stream in [*running, waiting]] == [200, 200, 200]
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err.decode()
    assert out.strip() and b"Traceback" not in err
    wait_for(server, running=0, waiting=0)


def test_a_stream_waiting_for_a_row_is_pinged_and_the_openai_client_reads_it(server, messages):
    """A stream waiting in the queue is answered 200 at once with `: ping` lines (SSE comments) every PING_S until
    its turn, so a client can tell a slow server from a dead one; the official openai client skips them."""
    openai = pytest.importorskip("openai")
    running = take_rows(server, messages)
    raw = Streaming(server, messages, max_tokens=4)
    wait_for(server, running=2, waiting=1)
    deadline = time.monotonic() + 60
    while raw.lines.count(": ping") < 3:
        assert time.monotonic() < deadline, raw.lines
        time.sleep(0.05)
    assert raw.status == 200 and set(raw.lines) <= {": ping", ""}, raw.lines  # nothing else while it waits
    assert server.health()["waiting"] == 1
    running.pop().close()  # a row is free: its turn
    raw.thread.join(60)
    assert [line for line in raw.lines if line][-1] == "data: [DONE]" and not raw.thread.is_alive(), raw.lines
    answer = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                     for line in raw.lines if line.startswith("data: {"))
    running.append(Streaming(server, messages))  # both rows taken again; the openai client's stream waits
    wait_for(server, running=2)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    chunks: list = []
    thread = threading.Thread(target=lambda: chunks.extend(client.chat.completions.create(
        model="x", messages=messages, stream=True, max_tokens=4)), daemon=True)
    thread.start()
    wait_for(server, running=2, waiting=1)
    time.sleep(3 * PING_S)  # pinged meanwhile
    running.pop().close()
    thread.join(60)
    assert chunks and chunks[0].choices[0].delta.role == "assistant", chunks
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer and answer
    assert chunks[-1].choices[0].finish_reason == "length"
    running.pop().close()
    wait_for(server, running=0, waiting=0)


def test_sigterm_past_grace_answers_what_is_in_flight_shutting_down_and_exits_0(server, messages, page):
    """The module's last test. In flight: a streamed and a plain answer of thousands of tokens (the two rows), and
    `idefics ask --server` waiting; SIGTERM with --grace 1 cancels them, each answered, and the server exits 0."""
    streamed = Streaming(server, messages)
    wait_for(server, running=1)  # before the next: the one waiting place is not the stream's
    plain = {}
    body = {"messages": messages, "max_tokens": LONG}
    thread = threading.Thread(target=lambda: plain.update(r=httpx.post(f"{server.url}/v1/chat/completions",
                                                                       json=body, timeout=120)), daemon=True)
    thread.start()
    wait_for(server, running=2)
    client = subprocess.Popen([sys.executable, "-m", "idefics_cli", "ask", page, "What is this?", "--server",
                               server.url, "--max-new-tokens", str(LONG)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    wait_for(server, running=2, waiting=1)
    server.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert server.proc.wait(60) == 0, "\n".join(server.lines)
    assert time.monotonic() - start < 30  # cancelled after the grace, not left to finish its 4000 tokens
    assert any("stopped" in line for line in server.lines), server.lines
    # no traceback, and none of uvicorn's own errors: every request was answered before uvicorn's deadline
    assert not [line for line in server.lines if "Traceback" in line or line.startswith("ERROR")], server.lines
    thread.join(60)
    streamed.close()
    # the plain answer: OpenAI's error object, 503 shutting_down
    r = plain["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["Retry-After"]
    # the stream: its pieces, then the same error as its last event, and [DONE]
    events = [line.removeprefix("data: ") for line in streamed.lines if line.startswith("data: ")]
    assert streamed.status == 200 and events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == "shutting_down", events[-3:]
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]), events[:3]
    # the CLI client waiting its turn: one error line naming the server (no traceback), exit 5
    out, err = client.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert client.returncode == 5 and b"Traceback" not in err, err.decode()
    assert len(lines) == 1 and lines[0].startswith("error [model_error]: ") and server.url in lines[0], lines
    logged = [line for line in server.lines if line.startswith("POST /v1/chat/completions 503")]
    assert logged, server.lines  # the plain answer (the waiting one was pinged: a 200 whose last event is the error)
