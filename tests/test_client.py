"""client.py and `--server`: ask, chat and transcribe through a running `idefics serve` equal local runs.

One real server (127.0.0.1, ephemeral port, an API key; the sharp tiny model, float32 CPU, tests/test_serve.py's
`Server`) answers the `--server` runs (subprocesses: the real entry point). The local runs they are compared with
are the same commands run in this process (the app through click's runner: no second interpreter, torch and the
model load once), made while the server loads. Timings differ between any two runs and are left out of
comparisons.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from conftest import make_image, make_pdf, run_idefics, run_traced

pytest.importorskip("fastapi")
from test_serve import FLAGS, KEY, Server  # noqa: E402 - after the skip: the server needs the serve extra

QUESTION = "What is the total amount due?"
TURNS = b"What is on this page?\nAnd who is the merchant?\n"
TOKENS = ["--max-new-tokens", "8"]
SCHEMA = "paid bool"  # a short object: it ends well within SCHEMA_TOKENS
SCHEMA_TOKENS = ["--max-new-tokens", "24"]
CUT_SCHEMA = "vendor, invoice_number, due_date"  # three strings: 8 tokens cut it


def untimed(obj: dict) -> dict:
    """The object without its timing; a confidence's log-probability rounded to 5 decimals: a page that shares its
    decoding steps with other pages (the server's batch, transcribe's) can round differently in the last bits
    (docs/batching.md), and its tokens are compared in full anyway."""
    out = {k: v for k, v in obj.items() if k != "timing"}
    if isinstance(out.get("confidence"), dict):
        out["confidence"] = {**out["confidence"], "mean_logprob": round(out["confidence"]["mean_logprob"], 5)}
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-docs")
    make_image(320, 240, seed=5).save(root / "page.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return {"png": str(root / "page.png"), "pdf": make_pdf(root / "report.pdf", 3), "root": root,
            "corrupt": str(root / "corrupt.png")}


@pytest.fixture(scope="module")
def started(sharp_model):
    srv = Server(sharp_model, "--api-key", KEY, "--max-batch", "4")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


class Run:
    """What a local run printed and returned (the fields of a CompletedProcess that the tests read)."""

    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout_bytes, result.stderr_bytes


@pytest.fixture(scope="module")
def local(sharp_model, docs, started):
    """The local runs (in this process, each loading the model), made while the server starts; and one early
    client of it (a subprocess started as soon as the server listens: it waits while the model loads)."""
    from typer.testing import CliRunner

    from idefics_cli.cli import app

    model = ["--model", sharp_model, *FLAGS]
    schema = ["--schema", SCHEMA, *SCHEMA_TOKENS]
    runs = {
        "json": (["ask", docs["pdf"], "--pages", "1-2", QUESTION, "--json", *model], None),
        "text": (["ask", docs["png"], QUESTION, *model], None),
        "transcribe": (["transcribe", docs["pdf"], "--out", str(docs["root"] / "local.jsonl"), *model], None),
        "chat": (["chat", docs["png"], *model], TURNS),
        "schema_json": (["ask", docs["pdf"], "--pages", "1-2", QUESTION, "--json", *model, *schema], None),
        "schema_text": (["ask", docs["png"], QUESTION, *model, *schema], None),
        "schema_cut_json": (["ask", docs["png"], QUESTION, "--json", *model, "--schema", CUT_SCHEMA], None),
        "schema_cut_text": (["ask", docs["png"], QUESTION, *model, "--schema", CUT_SCHEMA], None),
        "schema_transcribe": (["transcribe", docs["pdf"], "--out", str(docs["root"] / "local-schema.jsonl"),
                               *model, *schema], None),
    }
    out = {}

    def early():
        assert started._seen.wait(240) and started.url, "\n".join(started.lines)
        out["early"] = run_idefics("ask", docs["png"], QUESTION, "--server", started.url, "--api-key", KEY,
                                   *TOKENS)

    thread = threading.Thread(target=early)
    thread.start()
    runner = CliRunner()
    for k, (args, stdin) in runs.items():
        out[k] = Run(runner.invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=False))
    thread.join()
    for k, res in out.items():
        assert res.returncode == (5 if k.startswith("schema_cut") else 0), (k, res.stderr.decode())
    return out


@pytest.fixture(scope="module")
def server(started, local):
    return started.wait_ready()


def remote(server, *args, input=None, key=KEY):
    """`idefics ARGS` as a client of the server (IDEFICS_SERVER and IDEFICS_API_KEY from the environment)."""
    return run_idefics(*args, *TOKENS, input=input, env={"IDEFICS_SERVER": server.url, "IDEFICS_API_KEY": key})


def test_ask_json_over_the_server_equals_the_local_run(server, local, docs):
    res = remote(server, "ask", docs["pdf"], "--pages", "1-2", QUESTION, "--json")
    assert res.returncode == 0, res.stderr.decode()
    got, want = json.loads(res.stdout), json.loads(local["json"].stdout)
    assert untimed(got) == untimed(want)  # answer, finish reason, sources, split, model, usage, warnings
    assert got["usage"]["image_tokens"] > 0 and got["sources"] == [{"path": docs["pdf"], "pages": [1, 2]}]
    assert 0 < got["confidence"]["min_prob"] <= 1  # from the server's logprobs, equal to the local run's
    assert set(got["timing"]) == set(want["timing"])


def test_ask_text_over_the_server_equals_the_local_run(server, local, docs):
    res = run_idefics("ask", docs["png"], QUESTION, "--server", server.url, "--api-key", KEY, *TOKENS)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == local["text"].stdout
    assert ("cut at --max-new-tokens" in res.stderr.decode()) == ("cut at --max-new-tokens"
                                                                   in local["text"].stderr.decode())


def test_transcribe_over_the_server_gives_the_local_records_and_resumes_them(server, local, docs):
    out = docs["root"] / "remote.jsonl"
    res = remote(server, "transcribe", docs["pdf"], "--out", str(out))
    assert res.returncode == 0, res.stderr.decode()
    mine = [json.loads(line) for line in out.read_text().splitlines()]
    theirs = [json.loads(line) for line in (docs["root"] / "local.jsonl").read_text().splitlines()]
    assert len(mine) == 3 and all(r["status"] == "ok" for r in mine)
    assert sorted(map(untimed, mine), key=lambda r: r["page"]) == sorted(map(untimed, theirs),
                                                                        key=lambda r: r["page"])
    # the same settings hash: a `--server` run finds the local run's pages done (and nothing is written)
    before = (docs["root"] / "local.jsonl").read_text()
    again = remote(server, "transcribe", docs["pdf"], "--out", str(docs["root"] / "local.jsonl"))
    assert again.returncode == 0, again.stderr.decode()
    assert "nothing left to do" in again.stderr.decode()
    assert (docs["root"] / "local.jsonl").read_text() == before


def client(server, *args):
    """`idefics ARGS --server URL --api-key KEY` (the caller's own --max-new-tokens), in this process: a `--schema`
    run imports the grammar engine (and torch) for its schema check anyway, so a subprocess would only add an
    interpreter and those imports; the HTTP to the server is the same."""
    from typer.testing import CliRunner

    from idefics_cli.cli import app

    return Run(CliRunner().invoke(app, [str(a) for a in (*args, "--server", server.url, "--api-key", KEY)],
                                  catch_exceptions=False))


def test_ask_schema_over_the_server_equals_the_local_run(server, local, docs):
    """`--schema` goes as `response_format` json_schema; data, schema hash, text output and codes as locally."""
    res = client(server, "ask", docs["pdf"], "--pages", "1-2", QUESTION, "--json", "--schema", SCHEMA,
                 *SCHEMA_TOKENS)
    assert res.returncode == 0, res.stderr.decode()
    got, want = json.loads(res.stdout), json.loads(local["schema_json"].stdout)
    assert untimed(got) == untimed(want)
    assert isinstance(got["data"], dict) and isinstance(got["data"]["paid"], bool) and got["schema_sha256"]
    assert set(got["field_confidence"]) == {"paid"} and 0 < got["field_confidence"]["paid"] <= 1
    res = client(server, "ask", docs["png"], QUESTION, "--schema", SCHEMA, *SCHEMA_TOKENS)
    assert (res.returncode, res.stdout) == (0, local["schema_text"].stdout)
    assert isinstance(json.loads(res.stdout)["paid"], bool)
    # cut by --max-new-tokens: data null, `schema_truncated`, exit 5, in JSON and in text, as locally
    res = client(server, "ask", docs["png"], QUESTION, "--json", "--schema", CUT_SCHEMA, *TOKENS)
    got, want = json.loads(res.stdout), json.loads(local["schema_cut_json"].stdout)
    assert res.returncode == 5 and untimed(got) == untimed(want)
    assert got["data"] is None and got["error"]["code"] == "schema_truncated" and got["finish_reason"] == "length"
    res = client(server, "ask", docs["png"], QUESTION, "--schema", CUT_SCHEMA, *TOKENS)
    assert (res.returncode, res.stdout, res.stderr) == (5, b"", local["schema_cut_text"].stderr)
    assert res.stderr.decode().startswith("error [schema_truncated]: ")


def test_transcribe_schema_over_the_server_gives_the_local_records(server, local, docs):
    out = docs["root"] / "remote-schema.jsonl"
    res = client(server, "transcribe", docs["pdf"], "--out", str(out), "--schema", SCHEMA, *SCHEMA_TOKENS)
    assert res.returncode == 0, res.stderr.decode()
    mine = sorted((untimed(json.loads(line)) for line in out.read_text().splitlines()), key=lambda r: r["page"])
    theirs = sorted((untimed(json.loads(line)) for line in (docs["root"] / "local-schema.jsonl").read_text()
                     .splitlines()), key=lambda r: r["page"])
    assert len(mine) == 3 and all(r["status"] == "ok" and isinstance(r["data"]["paid"], bool) for r in mine)
    assert mine == theirs  # texts, data and the settings hash (the schema's included)


def test_chat_over_the_server_gives_the_local_turns(server, local, docs):
    res = remote(server, "chat", docs["png"], input=TURNS)
    assert res.returncode == 0, res.stderr.decode()
    got = [json.loads(line) for line in res.stdout.splitlines()]
    want = [json.loads(line) for line in local["chat"].stdout.splitlines()]
    assert [g["turn"] for g in got] == [1, 2]
    assert [untimed(g) for g in got] == [untimed(w) for w in want]
    assert got[1]["usage"]["prompt_tokens"] > got[0]["usage"]["prompt_tokens"]  # the first turn is kept


def test_the_client_imports_neither_torch_nor_transformers(server, docs, tmp_path):
    res, imported = run_traced("ask", docs["png"], QUESTION, "--server", server.url, "--api-key", KEY, *TOKENS,
                               tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr.decode()
    assert imported == []


def test_ask_json_over_the_server_imports_only_what_it_uses(server, docs, tmp_path):
    """`ask --server --json` (nothing to say on stderr): none of the model's libraries, no numpy, no Rich (nothing
    drawn), no schema machinery (no --schema). typer's own option coercion loads pydantic: that is typer's."""
    heavy = ("torch", "transformers", "numpy", "rich", "idefics_cli.structured",
             "jsonschema", "llguidance", "fastapi")
    res, imported = run_traced("ask", docs["pdf"], "--pages", "1", QUESTION, "--json", "--server", server.url,
                               "--api-key", KEY, *TOKENS, tmp_path=tmp_path, modules=heavy)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode()
    assert imported == []


def test_a_piped_warning_needs_neither_rich_nor_every_pillow_plugin(server, docs, tmp_path):
    """A cut answer over the server: the note is one plain line on the piped stderr, written without Rich, and the
    page goes as a TIFF without Pillow loading its every plugin (PdfImagePlugin comes only with all of them)."""
    res, imported = run_traced("ask", docs["pdf"], "--pages", "1", QUESTION, "--server", server.url, "--api-key", KEY,
                               "--max-new-tokens", "2", tmp_path=tmp_path,
                               modules=("rich", "PIL.PdfImagePlugin", "PIL.TiffImagePlugin"))
    assert res.returncode == 0, res.stderr.decode()
    assert res.stderr.decode() == "warning: the answer was cut at --max-new-tokens 2; raise it for the whole answer\n"
    assert imported == ["PIL.TiffImagePlugin"]


def test_the_library_connects_and_answers_as_ask_does(server, local, docs):
    import idefics_cli

    model = idefics_cli.connect(server.url + "/v1/", api_key=KEY, max_new_tokens=8)
    assert model.engine.url == server.url and model.options.split is False
    assert model.engine.render_side is None  # Idefics2's card: the documents' default (1960 px)
    answer = model.ask(docs["png"], QUESTION)
    assert answer.text + "\n" == local["text"].stdout.decode()
    assert answer.to_dict()["model"]["id"] == model.options.model


def test_a_server_that_is_down_is_a_model_error_naming_the_url(docs, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (["ask", docs["png"], QUESTION], ["transcribe", docs["png"], "--out", str(tmp_path / "r.jsonl")],
                 ["chat", docs["png"]]):
        res = run_idefics(*args, "--server", url, input=b"Hello?\n")
        lines = res.stderr.decode().strip().splitlines()
        assert res.returncode == 5, (args, lines)
        assert len(lines) == 1 and lines[0].startswith(f"error [model_error]: cannot reach the idefics server at "
                                                       f"{url}: "), lines
    assert not (tmp_path / "r.jsonl").exists()


def test_server_errors_come_back_with_the_clis_codes(server, docs):
    # over the model's context (32768): refused with `usage`, exit 2, as a local run is
    res = run_idefics("ask", docs["png"], QUESTION, "--server", server.url, "--api-key", KEY,
                      "--max-new-tokens", "32768")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error [usage]: "), lines
    assert "context" in lines[0]
    # a wrong key: model_error naming the option and the variable
    res = remote(server, "ask", docs["png"], QUESTION, key="wrong-key")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 5 and len(lines) == 1, lines
    assert "refused the API key" in lines[0] and "--api-key" in lines[0] and "IDEFICS_API_KEY" in lines[0]
    # a corrupt document fails here, before anything is sent, with the code of a local run
    res = remote(server, "ask", docs["corrupt"], QUESTION)
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 4 and lines[0].startswith("error [corrupt]: "), lines


def test_a_run_over_the_context_is_refused_before_any_page_as_locally(server, docs, tmp_path):
    """The card gives the server's context and the tokens its template and a page take: a `--server` run whose pages
    and --max-new-tokens cannot fit is the local run's one usage line (exit 2) before a page is sent, not one
    usage record a page."""
    out = tmp_path / "over.jsonl"
    res = client(server, "transcribe", docs["pdf"], "--out", out, "--max-new-tokens", "32768")
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error [usage]: 1 page images needs at least ") and "context of 32768" in lines[0]
    assert not out.exists() or out.read_text() == ""
    res = client(server, "ask", docs["pdf"], QUESTION, "--max-new-tokens", "32600")  # 65 tokens a page: 2 fit
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error [usage]: 3 page images needs at "
                                                                           "least "), lines
    assert lines[0].endswith("(at most 2 pages fit: narrow --pages)")


# what a server that is not (quite) `idefics serve` may send back: each must be a one-line model_error, exit 5
CARD = {"object": "list", "data": [{"id": "m", "object": "model", "idefics": {
    "id": "m", "quantization": "nf4", "dtype": "float32", "device": "cpu", "split": True, "max_request_mb": 64}}]}
BAD_STREAMS = [b"data: {not json", b'data: ["a", "list"]', b'data: {"choices": "zz"}', b'data: {"choices": ["zz"]}',
               b'data: {"choices": [{"delta": ["x"]}]}', b'data: {"choices": [{"delta": {"content": 5}}]}',
               b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": "zz"}',
               b'data: {"choices": [], "usage": {"completion_tokens": "8"}}',
               b'data: {"choices": [{"delta": {"content": "caf\xe9"}}]}',  # Latin-1, not UTF-8: no lost connection
               b"data: " + b"[" * 100_000]  # nested past Python's recursion limit
BAD_ANSWERS = [b'data: {"choices": [{"delta": {"content": 5}, "finish_reason": "stop"}], "usage": {}}',
               b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}], '
               b'"usage": {"completion_tokens": "eight"}}',
               b'data: {"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [{"token": "x", '
               b'"logprob": "low"}]}, "finish_reason": "stop"}], "usage": {}}'] + [
    b'data: {"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [{"token": "x", "logprob": %s}]}, '
    b'"finish_reason": "stop"}], "usage": {}}' % number for number in (b"NaN", b"Infinity", b"-Infinity", b'"nan"')]
# (Python's json reads NaN and Infinity, which no JSON reader takes back: the record would not be JSON)


@pytest.fixture
def odd_server():
    """A stdlib HTTP server on 127.0.0.1 with an idefics model card, whose chat completions stream `odd.reply`."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, kind: str):
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in odd.silent:  # no answer until the test ends
                odd.released.wait()
                return
            if odd.moved:  # a proxy sending http:// to https://
                self.send_response(301)
                self.send_header("location", odd.moved + self.path)
                self.end_headers()
                return
            health = self.path == "/health" and odd.health
            self._send(health or odd.card, "application/json")

        def do_POST(self):
            assert json.loads(self.rfile.read(int(self.headers["content-length"])))["stream"] is True
            odd.posts += 1
            if odd.posts in odd.stalls:  # its headers and a first chunk, then nothing until the test ends
                self.send_response(200)
                self.send_header("content-type", odd.kind)
                self.end_headers()
                self.wfile.write(b'data: {"choices": [{"delta": {"role": "assistant", "content": "x"}}]}\n\n')
                self.wfile.flush()
                odd.stalled.set()
                odd.released.wait()
                return
            self._send(odd.reply + b"\n\ndata: [DONE]\n\n", odd.kind)

    odd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    odd.url = f"http://127.0.0.1:{odd.server_address[1]}"
    odd.health = None  # /health's body; None: the card
    odd.card = json.dumps(CARD).encode()
    odd.posts, odd.stalls, odd.stalled, odd.released = 0, set(), threading.Event(), threading.Event()  # stalls: POST #s
    odd.silent = set()  # the GET paths left unanswered
    odd.kind = "text/event-stream"  # the content type of its answers
    odd.moved = None  # where GETs are redirected to (None: answered)
    threading.Thread(target=odd.serve_forever, daemon=True).start()
    yield odd
    odd.released.set()
    odd.shutdown()
    odd.server_close()


def test_a_server_answer_that_is_not_a_chat_completion_is_a_model_error(odd_server, docs, tmp_path):
    from idefics_cli.remote.client import RemoteEngine

    assert RemoteEngine(odd_server.url).render_side is None  # a card without `render_side`: the default
    for reply in BAD_STREAMS:
        odd_server.reply = reply
        res = run_idefics("ask", docs["png"], QUESTION, "--server", odd_server.url)
        lines = res.stderr.decode().strip().splitlines()
        assert res.returncode == 5 and lines == [
            f"error [model_error]: the server at {odd_server.url} sent a stream that is not a chat completion "
            "(start it with `idefics serve`, or check --server / IDEFICS_SERVER)"], (reply, lines)
        assert res.stdout == b""
    for reply in BAD_ANSWERS:
        odd_server.reply = reply
        res = run_idefics("transcribe", docs["png"], "--out", str(tmp_path / "r.jsonl"), "--server", odd_server.url)
        lines = res.stderr.decode().strip().splitlines()
        assert res.returncode == 5, (reply, lines)
        assert f"error [model_error]: the server at {odd_server.url} sent an answer that is not a chat completion" \
            in lines[-1], (reply, lines)


def test_ctrl_c_or_sigterm_while_a_server_stalls_ends_transcribe_at_once_keeping_its_pages(odd_server, docs, tmp_path):
    """A server that stops answering mid-transcription: Ctrl-C and SIGTERM end the run within seconds (exit 130; no
    thread left reading a connection the interpreter waits for), the page answered before kept for the rerun."""
    odd_server.reply = (b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}], '
                        b'"usage": {"completion_tokens": 1}}')
    out, args = tmp_path / "r.jsonl", ["--batch-size", "1", "--server", odd_server.url]
    for sig in (signal.SIGINT, signal.SIGTERM):
        odd_server.posts, odd_server.stalls = 0, {2, 3}
        odd_server.stalled.clear()
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "idefics_cli", "transcribe", docs["pdf"], "--out", str(out),
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            odd_server.stalled.wait(120)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{sig!r}: transcribe still ran 15 s after it")
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == 130, (sig, err.decode())
        assert [json.loads(line)["page"] for line in out.read_text().splitlines()] == [1], sig
    odd_server.posts, odd_server.stalls = 0, set()
    res = run_idefics("transcribe", docs["pdf"], "--out", str(out), *args)
    assert res.returncode == 0 and odd_server.posts == 2, res.stderr.decode()  # pages 2 and 3: page 1 was kept
    assert [json.loads(line)["page"] for line in out.read_text().splitlines()] == [1, 2, 3]


def test_an_answer_that_stalls_is_given_up_after_the_idle_bound_and_the_run_goes_on(odd_server, docs, tmp_path):
    """A server that sends its headers and one chunk, then nothing (wedged, or a proxy holding the connection): past
    IDEFICS_STREAM_IDLE_S the answer is a model_error saying so. ask exits 5; transcribe records that page and goes
    on (a rerun redoes it); chat reports the turn and answers the next."""
    odd_server.reply = (b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}], '
                        b'"usage": {"completion_tokens": 1}}')
    env, url = {"IDEFICS_STREAM_IDLE_S": "0.5"}, odd_server.url
    said = f"the idefics server at {url} sent nothing for 0.5 s"
    line = f"error [model_error]: {said} (it is stuck, or a proxy holds the connection; IDEFICS_STREAM_IDLE_S sets " \
           "the wait)"
    odd_server.stalls = {1}
    res = run_idefics("ask", docs["png"], QUESTION, "--server", url, env=env, timeout=60)
    assert (res.returncode, res.stderr.decode().splitlines()) == (5, [line]), res.stderr.decode()
    out, args = tmp_path / "r.jsonl", ["--out", tmp_path / "r.jsonl", "--batch-size", "1", "--server", url]
    odd_server.posts, odd_server.stalls = 0, {1}
    res = run_idefics("transcribe", docs["pdf"], *args, env=env, timeout=60)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert res.returncode == 3 and odd_server.posts == 3, res.stderr.decode()  # some pages failed
    assert [(r["page"], r["status"]) for r in records] == [(1, "error"), (2, "ok"), (3, "ok")]
    assert records[0]["error"] == {"code": "model_error", "message": said}
    odd_server.posts, odd_server.stalls = 0, set()
    res = run_idefics("transcribe", docs["pdf"], *args, env=env, timeout=60)
    assert res.returncode == 0 and odd_server.posts == 1, res.stderr.decode()  # page 1 alone, redone
    assert [(r["page"], r["status"]) for r in map(json.loads, out.read_text().splitlines())][-1] == (1, "ok")
    odd_server.posts, odd_server.stalls = 0, {1}
    res = run_idefics("chat", docs["png"], "--server", url, input=TURNS, env=env, timeout=60)
    assert (res.returncode, res.stderr.decode().splitlines()) == (5, [line]), res.stderr.decode()
    assert [json.loads(line)["answer"] for line in res.stdout.splitlines()] == ["x"]  # the second turn's


def test_a_server_that_never_answers_its_model_card_is_a_model_error_in_time(odd_server, monkeypatch):
    """/v1/models and /health answer at once (even while the model loads): a server that takes the connection and
    never answers them (a wrong port, a stuck proxy) is a model_error after JSON_TIMEOUT_S, not a hang."""
    from idefics_cli.errors import IdeficsError
    from idefics_cli.remote import transport
    from idefics_cli.remote.client import RemoteEngine

    monkeypatch.setattr(transport, "JSON_TIMEOUT_S", 1.0)
    odd_server.silent = {"/health"}
    assert RemoteEngine(odd_server.url).auto_batch_size() == 4  # the default, once the wait is over
    odd_server.silent = {"/v1/models"}
    with pytest.raises(IdeficsError) as err:
        RemoteEngine(odd_server.url)
    assert err.value.code == "model_error" and err.value.message.endswith(": no answer within 1 s"), err.value


def test_an_answer_that_is_no_event_stream_is_not_a_chat_completion(odd_server, docs):
    """A 200 that is a proxy's HTML page, or an answer not streamed, is no answer that ended early (ask again)."""
    for odd_server.kind, odd_server.reply in [("text/html", b"<html><body>Sign in to continue</body></html>"),
                                              ("application/json", json.dumps({"choices": [{"message": {
                                                  "content": "x"}, "finish_reason": "stop"}]}).encode())]:
        res = run_idefics("ask", docs["png"], QUESTION, "--server", odd_server.url)
        assert res.returncode == 5 and res.stderr.decode().splitlines() == [
            f"error [model_error]: the server at {odd_server.url} sent a stream that is not a chat completion "
            "(start it with `idefics serve`, or check --server / IDEFICS_SERVER)"], res.stderr.decode()


def test_a_redirect_names_where_it_goes(odd_server, docs):
    odd_server.moved = "https://idefics.example"
    res = run_idefics("ask", docs["png"], QUESTION, "--server", odd_server.url)
    assert res.returncode == 5 and res.stderr.decode().splitlines() == [
        f"error [model_error]: the server at {odd_server.url} redirects /v1/models to "
        "https://idefics.example/v1/models (pass the URL it redirects to as --server)"], res.stderr.decode()


def test_a_health_body_that_is_not_an_object_leaves_the_default_batch(odd_server):
    from idefics_cli.remote.client import RemoteEngine

    for body in (b"[4, 8]", b"null", b'"max_batch"'):
        odd_server.health = body
        assert RemoteEngine(odd_server.url).auto_batch_size() == 4, body
    odd_server.health = b'{"max_batch": 1000000}'  # past serve's --max-batch 256: pages rendered and sent at once
    assert RemoteEngine(odd_server.url).auto_batch_size() == 256


def test_a_model_card_with_odd_values_is_a_model_error_or_the_defaults(odd_server):
    from idefics_cli.errors import IdeficsError
    from idefics_cli.remote.client import TIFF_BUDGET, RemoteEngine

    def card(**described) -> bytes:
        return json.dumps({"data": [{"id": "m", "idefics": {**CARD["data"][0]["idefics"], **described}}]}).encode()

    for odd_server.card in (card(quantization=["nf4"]), card(quantization={}), b"[" * 100_000):
        with pytest.raises(IdeficsError) as err:
            RemoteEngine(odd_server.url)
        assert err.value.code == "model_error" and "not" in err.value.message, odd_server.card[:60]
    for odd_server.card in (card(), card(context_size="8", prompt_tokens=9, page_tokens=True)):
        RemoteEngine(odd_server.url).check_context(1, QUESTION, 32768)  # no (usable) context: left to the server
    odd_server.card = card(context_size=8, page_tokens=1)
    with pytest.raises(IdeficsError, match="context of 8"):
        RemoteEngine(odd_server.url).check_context(1, QUESTION, 8)
    odd_server.card = card(max_request_mb=1e400)  # read as infinity: no limit
    assert RemoteEngine(odd_server.url).tiff_budget == TIFF_BUDGET
    odd_server.card = card(id=["m"], revision={}, dtype=7, device=[], family=1, quantization_reason=5)
    engine = RemoteEngine(odd_server.url)
    assert engine.info == {"id": None, "revision": None, "quantization": "nf4", "quantization_reason": None,
                           "dtype": None, "device": None, "family": None}
    assert (engine.options.model, engine.options.dtype, engine.options.device) == ("m", "auto", "auto")


def test_pages_reach_the_server_as_the_very_pixels_of_a_local_run(docs):
    """TIFF (PackBits) and PNG data: URLs decode, through the server's own reader, to the images the local run feeds
    the processor; a TIFF source's own tags (its EXIF orientation) do not travel with it."""
    from PIL import Image

    from idefics_cli.documents import open_document
    from idefics_cli.remote.client import page_data_url
    from idefics_cli.serve.requests import _data_url

    cmyk = docs["root"] / "cmyk.jpg"
    make_image(200, 150, seed=9).convert("CMYK").save(cmyk)
    turned = docs["root"] / "turned.tif"  # orientation 6: the local run turns it; the server must not turn it again
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(90, 60, seed=3).save(turned, exif=exif, compression="tiff_lzw")
    pages = []
    for path in (docs["pdf"], docs["png"], str(cmyk), str(turned)):
        with open_document(path) as doc:
            pages.append(doc.render(1))
    assert pages[-1].size == (60, 90)
    raw = Image.open(turned)  # a caller's own TIFF image, as it is (its orientation tag not applied)
    raw.load()
    pages.append(raw)
    for image in pages:
        tiff, spent = page_data_url(image)
        for url in (tiff, page_data_url(image, 0)[0]):
            with open_document("part", data=_data_url(url, "part")) as doc:
                seen = doc.render(1)
            assert image.mode == "RGB" and seen.mode == "RGB"
            assert seen.size == image.size and seen.tobytes() == image.tobytes()
        assert tiff.startswith("data:image/tiff;base64,") and base64.b64decode(tiff.split(",", 1)[1])[:4] == b"II*\x00"
        assert spent == len(base64.b64decode(tiff.split(",", 1)[1]))
    png = page_data_url(pages[0], 0)[0]
    assert png.startswith("data:image/png;base64,") and base64.b64decode(png.split(",", 1)[1])[:4] == b"\x89PNG"


def test_a_requests_tiffs_stay_within_its_budget(docs):
    """Pages go as TIFF while the request's TIFF bytes fit the budget, then as PNG; a budget of 0 is all PNG."""
    from idefics_cli.documents import open_document
    from idefics_cli.remote.client import _image_part, page_data_url

    with open_document(docs["pdf"]) as doc:
        pages = [doc.render(p) for p in (1, 2, 3)]
    sizes = [page_data_url(image)[1] for image in pages]
    budget = [sizes[0] + sizes[1] + sizes[2] - 1]  # the third page no longer fits
    kinds = [_image_part(image, budget)["image_url"]["url"][5:15] for image in pages]
    assert kinds == ["image/tiff", "image/tiff", "image/png;"] and budget == [sizes[2] - 1]
    assert page_data_url(pages[0], 0)[0].startswith("data:image/png;base64,") and page_data_url(pages[0], 0)[1] == 0
    assert page_data_url(pages[0], sizes[0] - 1)[1] == 0


def test_a_client_started_while_the_server_loads_waits_for_it(server, local):
    """`ask --server` run as soon as the server listened (while its model loaded: /v1/models answers 503 `loading`)
    waits for the model and answers as the local run does."""
    assert local["early"].stdout == local["text"].stdout
    waited = [line for line in server.lines if line.startswith("GET /v1/models 503")]
    print(f"the early client was refused {len(waited)} time(s) while the model loaded")


def test_server_options_are_checked_before_connecting(cli, docs):
    result = cli("transcribe", "x.pdf", "--server", "http://127.0.0.1:9", "--engine", "ray")
    assert result.exit_code == 2 and "--server and --engine ray cannot be combined" in result.stderr
    result = cli("ask", docs["png"], "Q?", "--server", "ftp://127.0.0.1:9")
    assert result.exit_code == 2 and "is not an http(s) URL" in result.stderr


def test_a_model_option_the_server_does_not_serve_is_reported(server, local, docs):
    res = remote(server, "ask", docs["png"], QUESTION, "--model", "someone/other-model")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == local["text"].stdout
    assert f"--model someone/other-model is not used: the server at {server.url} serves " in res.stderr.decode()


def test_a_client_renders_pdf_pages_at_the_servers_family_size(tiny_idefics3, engine3, docs):
    """An Idefics3 server's card says its render size (2048 px, as `ask` renders locally); the real client
    (`connect`) renders PDF pages at it: the page the server receives (recorded by a forwarding proxy) has it."""
    import http.client
    import http.server
    import urllib.parse

    import idefics_cli
    from idefics_cli.documents import open_document
    from idefics_cli.serve.requests import _data_url

    srv = Server(tiny_idefics3).wait_ready()
    bodies = []

    class Forward(http.server.BaseHTTPRequestHandler):
        def _forward(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0)) or None
            bodies.append(body)
            upstream = http.client.HTTPConnection(*urllib.parse.urlsplit(srv.url).netloc.split(":"))
            upstream.request(self.command, self.path, body, {"Content-Type": "application/json"})
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        model = idefics_cli.connect(url, max_new_tokens=4)
        assert model.engine.render_side == engine3.render_side == 2048 and model.engine.doctags is False
        assert model.ask(docs["pdf"], QUESTION, pages="1").text is not None
        library = bodies[-1]
        cli = run_idefics("ask", docs["pdf"], QUESTION, "--pages", "1", "--server", url, "--max-new-tokens", "4")
        assert cli.returncode == 0, cli.stderr.decode()
    finally:
        proxy.shutdown()
        proxy.server_close()
        assert srv.stop() == 0, "\n".join(srv.lines)
    for body in (library, bodies[-1]):  # the library's request, then `idefics ask --server`'s
        sent = json.loads(body)["messages"][0]["content"][0]["image_url"]["url"]
        with open_document("page", data=_data_url(sent, "page")) as doc:
            assert max(doc.render(1).size) == 2048


def test_a_server_started_with_quant_auto_and_a_local_run_resume_each_other(cli, tiny_model, tmp_path):
    """Both leave --quant at auto: the same settings hash, so neither redoes the other's pages (the test server runs
    --no-split, so the local run does too)."""
    srv = Server(tiny_model, "--quant", "auto").wait_ready()
    try:
        make_image(seed=5).save(tmp_path / "page.png")
        out = tmp_path / "o.jsonl"
        remote = cli("transcribe", tmp_path / "page.png", "--out", out, "--server", srv.url, "--max-new-tokens", "4")
        assert remote.exit_code == 0, remote.stderr
        local = cli("transcribe", tmp_path / "page.png", "--out", out, "--model", tiny_model, "--device", "cpu",
                    "--no-split", "--max-new-tokens", "4")
        assert local.exit_code == 0 and "1 already done" in local.stderr + local.stdout, local.stderr
        assert len(out.read_text().splitlines()) == 1
    finally:
        srv.stop()
