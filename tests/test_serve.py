"""`idefics serve` end to end: a real server on 127.0.0.1 (ephemeral port) and the official openai client.

One server (API key, batch 4, 1 MiB request cap) serves the module's tests; its last test ends it with SIGTERM
(tests/test_serve_server.py: a full queue, SIGTERM past --grace). Answers are compared with `idefics ask --json`
on the same model, page and question (the sharp tiny model, float32 CPU).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_image, make_pdf, run_idefics

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
FLAGS = ["--quant", "none", "--device", "cpu", "--max-new-tokens", "8", "--no-split"]  # split: test_serve_scheduler.py
QUESTION = "What is the total amount due?"
FOLLOW_UP = "And who is the merchant?"


class Server:
    """`python -m idefics_cli serve --port 0 ...` in a subprocess; stderr collected line by line."""

    def __init__(self, model: str, *args: str, env: dict | None = None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("IDEFICS_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "idefics_cli", "serve", "--model", model, "--port", "0",
                                      *FLAGS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self._seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._seen.set()
        self._seen.set()

    def wait_ready(self, timeout: float = 240) -> Server:
        assert self._seen.wait(timeout) and self.url, "\n".join(self.lines)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "\n".join(self.lines)
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server never became ready:\n" + "\n".join(self.lines))

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(url: str, question: str) -> dict:
    # text first on purpose: the server puts a message's images first, as `ask` does
    return {"role": "user", "content": [{"type": "text", "text": question},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def file_part(path: str, pages: str | None = None) -> dict:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    inner = {"filename": os.path.basename(path), "file_data": f"data:application/pdf;base64,{data}"}
    if pages is not None:
        inner["pages"] = pages
    return {"type": "file", "file": inner}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-docs")
    page = make_image(320, 240, seed=3)
    page.save(root / "page.png")
    return {"png": str(root / "page.png"), "image": page, "pdf": make_pdf(root / "report.pdf", 3)}


@pytest.fixture(scope="module")
def started(sharp_model):
    """The module's server, started (not yet ready): the reference runs load their models meanwhile."""
    srv = Server(sharp_model, "--api-key", KEY, "--max-batch", "4", "--max-queue", "32", "--max-request-mb", "1",
                 "--grace", "120")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


@pytest.fixture(scope="module")
def reference(sharp_model, docs, started):
    """`idefics ask --json` answers, run while the server starts: the app in this process (click's runner; each
    run loads the model, as `idefics ask` does, without a second interpreter)."""
    from typer.testing import CliRunner

    from idefics_cli.cli import app

    runs = {
        "page": [docs["png"], QUESTION],
        "pdf": [docs["pdf"], "--pages", "2-3", FOLLOW_UP],
    }
    runner, out = CliRunner(), {}
    for k, args in runs.items():
        res = runner.invoke(app, ["ask", *args, "--json", "--model", sharp_model, *FLAGS], catch_exceptions=False)
        assert res.exit_code == 0, res.stderr
        out[k] = json.loads(res.stdout)
    return out


@pytest.fixture(scope="module")
def server(started, reference):
    return started.wait_ready()


def test_answers_equal_ask_json_streamed_or_not(server, reference, docs):
    ref = reference["page"]
    client = server.client()
    messages = [image_message(data_url(docs["image"]), QUESTION)]
    done = client.chat.completions.create(model="idefics2", messages=messages)
    assert done.choices[0].message.content == ref["answer"]
    assert done.choices[0].finish_reason == ref["finish_reason"]
    assert done.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]

    stream = client.chat.completions.create(model="idefics2", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == ref["answer"]
    assert finish == ref["finish_reason"]
    assert usage is not None and usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same page as the call before


def test_logprobs_streamed_or_not_are_the_local_answers_tokens(server, reference, docs):
    """OpenAI's logprobs shape; each token's text follows the one before it, so they make the local confidence."""
    from idefics_cli.tasks.confidence import summary

    ref = reference["page"]
    client = server.client()
    messages = [image_message(data_url(docs["image"]), QUESTION)]
    done = client.chat.completions.create(model="x", messages=messages, logprobs=True, top_logprobs=2)
    content = done.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ref["answer"] == done.choices[0].message.content
    assert len(content) == ref["usage"]["completion_tokens"]
    assert all(t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2 for t in content)
    for t in content:  # greedy: the chosen token is the likeliest
        assert t.top_logprobs[0].logprob == t.logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].bytes == list(t.top_logprobs[0].token.encode())
    ends = [len("".join(t.token for t in content[:j + 1])) for j in range(len(content))]
    assert summary([t.logprob for t in content], ends) == ref["confidence"]

    streamed = []
    for chunk in client.chat.completions.create(model="x", messages=messages, logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.top_logprobs) for t in streamed] == [(t.token, t.logprob, []) for t in content]
    assert client.chat.completions.create(model="x", messages=messages).choices[0].logprobs is None
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}, {"logprobs": "yes"}):
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.chat.completions.create(model="x", messages=messages, **bad)


def test_pdf_pages_then_a_second_question_hits_the_cache(server, reference, docs):
    """A PDF file part with a page selection; the follow-up over the same pages reuses their cached prefix."""
    client = server.client()
    part = file_part(docs["pdf"], pages="2-3")
    first = client.chat.completions.create(model="x", messages=[
        {"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    before = server.health()["cache"]["hits"]
    second = client.chat.completions.create(model="x", messages=[
        {"role": "user", "content": [part, {"type": "text", "text": FOLLOW_UP}]}])
    ref = reference["pdf"]
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert server.health()["cache"]["hits"] == before + 1
    # the uncached answer: `idefics ask report.pdf --pages 2-3` (a fresh process, nothing cached)
    assert second.choices[0].message.content == ref["answer"]
    assert second.usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_next_turn_of_a_conversation_keeps_its_images_and_hits_the_cache(server, docs):
    client = server.client()
    url = data_url(make_image(300, 220, seed=11))
    turn1 = [image_message(url, QUESTION)]
    a1 = client.chat.completions.create(model="x", messages=turn1)
    turn2 = [*turn1, {"role": "assistant", "content": a1.choices[0].message.content},
             {"role": "user", "content": FOLLOW_UP}]
    a2 = client.chat.completions.create(model="x", messages=turn2)
    assert a2.usage.prompt_tokens > a1.usage.prompt_tokens
    assert a2.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's image prefix
    assert a2.choices[0].finish_reason in ("stop", "length")


def test_models_health_and_errors(server, docs, tmp_path):
    url = server.url
    assert server.health()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] and models.data[0].object == "model"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(body, **kw):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{url}/v1/chat/completions", content=content, headers={**auth, **kw}, timeout=60)

    encrypted = tmp_path / "locked.pdf"
    import pymupdf

    doc = pymupdf.open(docs["pdf"])
    doc.save(str(encrypted), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="pw")
    doc.close()
    cases = [
        (b"{not json", 400, "usage"),
        ({"messages": []}, 400, "usage"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "usage"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "usage"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40000}, 400, "usage"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "usage"),
        ({"messages": [image_message("https://example.com/x.png", "q")]}, 400, "usage"),
        ({"messages": [image_message("data:image/png;base64,%%%", "q")]}, 400, "corrupt"),
        ({"messages": [image_message("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode(),
                                     "q")]}, 400, "corrupt"),
        ({"messages": [image_message("data:text/plain;base64,aGVsbG8=", "q")]}, 400, "unsupported_format"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}, 400, "usage"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "/etc/passwd"}}]}]},
         400, "corrupt"),
        ({"messages": [{"role": "user", "content": [file_part(docs["pdf"], "9")]}]}, 400, "page_out_of_range"),
        ({"messages": [{"role": "user", "content": [file_part(docs["pdf"], "3-1")]}]}, 400, "usage"),
        ({"messages": [{"role": "user", "content": [file_part(str(encrypted))]}]}, 400, "encrypted"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
            **file_part(str(encrypted))["file"], "password": "nope"}}]}]}, 400, "wrong_password"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "usage"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}).encode(), 413,
         "request_too_large"),
    ]
    for body, status, code in cases:
        r = post(body)
        assert r.status_code == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], r.text)
        error = r.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], r.text
    assert httpx.get(f"{url}/nope").status_code == 404
    assert httpx.get(f"{url}/v1/chat/completions", headers=auth).status_code == 405
    assert server.health()["status"] == "ok"


def test_seeded_sampling_repeats_and_stop_cuts_the_answer(server, docs):
    client = server.client()
    messages = [image_message(data_url(docs["image"]), QUESTION)]
    kw = {"temperature": 1.5, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    a = client.chat.completions.create(model="x", messages=messages, **kw).choices[0].message.content
    b = client.chat.completions.create(model="x", messages=messages, **kw).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(model="x", messages=messages).choices[0].message.content
    assert len(greedy) > 4
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    cut = client.chat.completions.create(model="x", messages=messages, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.chat.completions.create(model="x", messages=messages, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_16_concurrent_clients_good_and_bad(server, docs):
    images = [data_url(make_image(280 + 10 * k, 200, seed=20 + k)) for k in range(5)]
    good = [[image_message(images[k % 5], QUESTION if k < 5 else FOLLOW_UP)] for k in range(10)]
    corrupt_pdf = {"type": "file", "file": {"file_data": base64.b64encode(b"%PDF-1.7\n1 0 obj garbage").decode()}}
    truncated = data_url(make_image(seed=1))[:200]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"

    def ask(messages, key=KEY):
        try:
            r = server.client(key).chat.completions.create(model="x", messages=messages)
            return 200, r.choices[0].message.content
        except openai.APIStatusError as exc:
            return exc.status_code, exc.body

    def raw(content: bytes, headers=auth):
        r = httpx.post(url, content=content, headers=headers, timeout=120)
        return r.status_code, r.json()

    jobs = [lambda m=m: ask(m) for m in good]
    jobs += [lambda: ask([{"role": "user", "content": [corrupt_pdf, {"type": "text", "text": "q"}]}]),
             lambda: ask([image_message(truncated, "q")]),
             lambda: raw(b'{"messages": [{"role": "user", "content": '),
             lambda: raw(b'{"messages": "' + b"a" * (3 * 2**20) + b'"}'),
             lambda: ask(good[0], key="wrong"),
             lambda: raw(json.dumps({"messages": good[0]}).encode(), headers={"Content-Type": "application/json"})]
    assert len(jobs) == 16
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    for status, _ in results[10:]:
        assert 400 <= status < 500, results[10:]
    assert [s for s, _ in results[10:]] == [400, 400, 400, 413, 401, 401]
    assert all(status == 200 for status, _ in results[:10]), results[:10]
    # each good answer is the one the same request gets alone
    for messages, (_, answer) in zip(good, results[:10]):
        assert ask(messages) == (200, answer)
    health = server.health()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def wait_until_freed(server, before: dict) -> None:
    """Until no row runs and one more job than in `before` counts as cancelled."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["cancelled"] == before["cancelled"] + 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"the row was not freed: {server.health()}")


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, docs):
    before = server.health()
    body = {"messages": [image_message(data_url(docs["image"]), QUESTION)], "stream": True, "max_tokens": 4000}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '"role"' not in line:
                break  # the first piece of the answer: now hang up
        else:
            raise AssertionError("the stream ended before its first piece")
    # the connection is closed: the row leaves the batch and the job counts as cancelled, long before 4000 tokens
    wait_until_freed(server, before)
    answer = server.client().chat.completions.create(model="x", messages=body["messages"])
    assert answer.choices[0].finish_reason in ("stop", "length")
    logged = [line for line in server.lines if line.startswith("POST /v1/chat/completions 200")]
    assert logged and all(re.search(r" tokens=\d+ \d+\.\d+s$", line) for line in logged)


def test_a_client_that_times_out_before_a_plain_answer_is_logged_as_499(server, docs):
    """Not as a 200 that nobody read: the access log and the status counts say the client went away."""
    before = server.health()
    body = {"messages": [image_message(data_url(docs["image"]), QUESTION)], "max_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=1.5))
    wait_until_freed(server, before)
    deadline = time.monotonic() + 10
    while not any(line.startswith("POST /v1/chat/completions 499 ") for line in server.lines):
        assert time.monotonic() < deadline, server.lines[-5:]
        time.sleep(0.1)


def test_a_client_gone_before_its_answer_started_is_logged_as_499(server, docs):
    """Mid-upload (not a 500 with a traceback) or while queued behind a full batch (not a 503)."""
    import socket

    def send(body: bytes, length: int | None = None) -> socket.socket:
        conn = socket.create_connection(server.url.removeprefix("http://").split(":"))
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), length or len(body), body))
        return conn

    def wait(test, what: str) -> None:
        deadline = time.monotonic() + 30
        while not test():
            assert time.monotonic() < deadline, (what, server.health(), server.lines[-5:])
            time.sleep(0.05)

    def logged(status: str) -> int:
        return sum(line.startswith(f"POST /v1/chat/completions {status} ") for line in server.lines)

    gone = logged("499")
    send(b'{"messages": [', 1000).close()  # hangs up halfway through its body
    wait(lambda: logged("499") == gone + 1, "the upload's 499")
    messages = [image_message(data_url(docs["image"]), QUESTION)]
    long = json.dumps({"messages": messages, "stream": True, "max_tokens": 4000}).encode()
    rows = [send(long) for _ in range(4)]  # the batch is full
    wait(lambda: server.health()["running"] == 4, "a full batch")
    queued = send(json.dumps({"messages": messages, "max_tokens": 4}).encode())
    wait(lambda: server.health()["waiting"] == 1, "a queued request")
    queued.close()
    wait(lambda: logged("499") == gone + 2, "the queued request's 499")
    for row in rows:
        row.close()
    wait(lambda: server.health()["running"] == 0, "the rows freed")
    assert not logged("500") and not logged("503")
    assert not any("Traceback" in line or "internal error" in line for line in server.lines), server.lines


def test_sigterm_drains_in_flight_requests_and_exits_0(server, docs):
    """The module's last test: SIGTERM while a stream is in flight; it finishes whole, then the server exits 0."""
    client = server.client()
    messages = [image_message(data_url(docs["image"]), QUESTION)]
    stream = client.chat.completions.create(model="x", messages=messages, stream=True, max_tokens=40,
                                            stream_options={"include_usage": True})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    usage = [c.usage for c in rest if c.usage is not None]
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert usage and (usage[0].completion_tokens == 40 or finish == ["stop"])
    assert server.proc.wait(60) == 0
    assert any("stopped" in line for line in server.lines), server.lines
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_a_non_loopback_host_without_a_key_refuses_to_start(tmp_path):
    res = run_idefics("serve", "--host", "0.0.0.0", "--port", "0", "--model", str(tmp_path / "no-model"))
    assert res.returncode == 2
    assert b"error [usage]" in res.stderr and b"--api-key" in res.stderr


def test_a_model_that_cannot_load_ends_the_server_with_its_error(tmp_path):
    res = run_idefics("serve", "--port", "0", "--model", str(tmp_path / "no-model"), "--offline", timeout=120)
    assert res.returncode == 5, res.stderr.decode()
    assert b"error [model_error]" in res.stderr and b"listening on" in res.stderr
