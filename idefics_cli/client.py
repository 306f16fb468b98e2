"""The client: a running `idefics serve` as the engine (`--server URL`), with no torch in this process.

Contract:
- `connect(url, api_key=None, max_new_tokens=None)` asks the server for its model (`GET /v1/models`; while the
  server is still loading it waits, up to LOAD_WAIT_S) and returns a `RemoteEngine`. A server that is down or
  refuses the connection is `model_error` naming the URL, at once or after CONNECT_TIMEOUT_S; a refused API
  key (401) is `model_error` with a hint about --api-key / IDEFICS_API_KEY.
- `RemoteEngine` has what `ask`, `chat` and `transcribe` use of a loaded `Engine` (engine.py), so the
  commands and the library run the same code paths with either: `options` and `info` are the server's model
  settings (`max_new_tokens` the caller's), `ask` and `transcribe` are `Engine`'s own methods; `prepare(batch)`
  turns [(page images, question)] into requests, each page a lossless PNG `data:` URL (RGB, no colour
  profile or transparency chunk), which the server decodes to the very pixels a local run feeds the
  processor; `stream_generate(inputs)` streams the answer (server-sent events) and returns its `Generation`,
  with the server's token counts as `prompt_usage`; `generate_batch(inputs)` sends a batch's pages at once
  (the server decodes them together); `usage(inputs, row)` is the server's count once answered;
  `chat_inputs(messages, images, max_new_tokens)` sends a whole conversation (conversation.py);
  `check_context` is left to the server (it refuses a prompt over the context with `usage`);
  `auto_batch_size()` is the server's --max-batch.
- Errors keep the CLI's codes: the server's error object carries them (a 400's `usage`, `corrupt`, ...), a
  503 `out_of_memory` stays `out_of_memory`, an overloaded server (503) is retried after its Retry-After for
  up to OVERLOAD_WAIT_S, anything else the server fails with, or a connection lost, is `model_error`.
- HTTP is the standard library's http.client (no dependency beyond the core ones); nothing here imports torch,
  transformers or numpy. The pages are rendered by the caller (selection.py, documents.py), as in local runs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import ssl
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine import Engine, Generation
from .errors import EXIT_FOR_CODE, IdeficsError, UsageError
from .model import ModelOptions

CONNECT_TIMEOUT_S = 1.5  # a server that does not answer the connection: model_error well within 2 s
LOAD_WAIT_S = 600.0  # how long a request waits for a server that is still loading its model
OVERLOAD_WAIT_S = 120.0  # how long a request is retried while the server's queue is full
SERVER_HINT = "start it with `idefics serve`, or check --server / IDEFICS_SERVER"
KEY_HINT = "pass --api-key KEY or set IDEFICS_API_KEY: the key `idefics serve` was started with"
QUANT_OPTIONS = {"nf4": "4bit", "int8": "8bit", "none": "none"}  # engine.QUANT_NAMES, reversed
_CLIENT_CODES = set(EXIT_FOR_CODE) - {"internal", "interrupted"}


@dataclass
class RemoteGeneration(Generation):
    """A finished answer from the server: `Generation` plus the server's prompt token counts."""

    prompt_usage: dict = field(default_factory=dict)


@dataclass
class RemoteInputs:
    """One request per row: the OpenAI messages (pages as data: URLs); `usage` per row once answered."""

    rows: list[list[dict]]
    usage: list[dict | None] = field(default_factory=list)

    def __post_init__(self):
        self.usage = [None] * len(self.rows)


def normalize_url(url: str) -> str:
    """`host:port`, `http://host:port/`, or an OpenAI base URL ending in /v1: the server's root URL."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {url!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UsageError(f"--server {url!r} has a bad port", "e.g. --server http://127.0.0.1:8000") from None
    return url


def connect(url: str, api_key: str | None = None, max_new_tokens: int | None = None) -> RemoteEngine:
    """The model of the `idefics serve` at `url`, as an engine (see the module contract)."""
    return RemoteEngine(url, api_key, max_new_tokens)


class RemoteEngine:
    """A running server's model, used like a loaded `Engine` (its `ask` and `transcribe` are Engine's)."""

    ask = Engine.ask
    transcribe = Engine.transcribe

    def __init__(self, url: str, api_key: str | None = None, max_new_tokens: int | None = None):
        self.url = normalize_url(url)
        self.api_key = api_key or None
        parts = urllib.parse.urlsplit(self.url)
        self._https, self._host, self._port, self._root = (parts.scheme == "https", parts.hostname, parts.port,
                                                           parts.path)
        start = time.perf_counter()
        card = self._models()
        self.load_s = time.perf_counter() - start  # what a local run spends loading: here, reaching the server
        self.model_id = card.get("id") or ""
        described = card.get("idefics")
        if not isinstance(described, dict) or "quantization" not in described:
            raise IdeficsError("model_error", f"{self.url} is not an `idefics serve` server (no model settings in "
                               "/v1/models)", SERVER_HINT)
        self.split = bool(described.get("split", True))
        self._info = {k: described.get(k) for k in ("id", "revision", "quantization", "dtype", "device")}
        defaults = ModelOptions()
        self.options = ModelOptions(model=self._info["id"] or self.model_id, revision=self._info["revision"],
                                    quant=QUANT_OPTIONS.get(self._info["quantization"], "4bit"),
                                    dtype=self._info["dtype"] or "auto", device=self._info["device"] or "auto",
                                    offline=True, split=self.split,
                                    max_new_tokens=max_new_tokens or defaults.max_new_tokens)
        self.processor = None  # nothing of the model lives here
        self.context_size = None  # the server checks the context

    @property
    def info(self) -> dict:
        return dict(self._info)

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.url} {self.options.model}>"

    # ---- what ask, chat and transcribe use of an Engine ---------------------------------------
    def check_context(self, n_images: int, question: str, max_new_tokens: int) -> None:
        """Left to the server: it refuses a prompt over the model's context (`usage`) before rendering."""
        return None

    def auto_batch_size(self) -> int:
        """Pages a transcription sends at once: the server's --max-batch (rows it decodes together)."""
        try:
            health = self._json("GET", "/health")
        except IdeficsError:
            return 4
        size = health.get("max_batch")
        return size if isinstance(size, int) and size > 0 else 4

    def prepare(self, batch: list[tuple[list, str]], split: bool | None = None, collect: bool = False):
        """One request per (images, question): a user turn with the pages first, then the question.

        `split` is the server's (a per-call override cannot reach it); images may be PIL images or functions
        that render one (selection.py's pages not kept).
        """
        rows = []
        for images, question in batch:
            parts = [_image_part(image() if callable(image) else image) for image in images]
            rows.append([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}])
        return RemoteInputs(rows)

    def chat_inputs(self, messages: list[dict], images: list, max_new_tokens: int) -> RemoteInputs:
        """The whole conversation (transformers chat format, `{"type": "image"}` in page order) as one request."""
        cache = self.__dict__.setdefault("_chat_urls", {})  # id(image) -> (image, url): each page encoded once
        urls = iter(images)
        out = []
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in content if isinstance(content, list) else ():
                if part.get("type") == "image":
                    image = next(urls)
                    if id(image) not in cache:
                        cache[id(image)] = (image, _image_part(image))
                    parts.append(cache[id(image)][1])
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
            out.append({"role": message["role"], "content": parts})
        live = {id(image) for image in images}
        for key in [k for k in cache if k not in live]:
            del cache[key]
        return RemoteInputs([out])

    def usage(self, inputs: RemoteInputs, row: int = 0) -> dict:
        """{"prompt_tokens", "image_tokens"} as the server counted them (None until the row is answered)."""
        return dict(inputs.usage[row] or {"prompt_tokens": None, "image_tokens": None})

    def stream_generate(self, inputs: RemoteInputs, max_new_tokens: int | None = None, logits_processor=None):
        """Yield the pieces of the (one-row) answer as the server streams them; return its `RemoteGeneration`.

        Closing the generator closes the connection: the server cancels the generation.
        """
        _no_logits_processor(logits_processor)
        body = self._body(inputs.rows[0], max_new_tokens, stream=True)
        start = time.perf_counter()
        conn, resp = self._post(body)
        pieces, first, finish, usage = [], None, None, None
        try:
            for event in _events(resp):
                if "error" in event:
                    raise self._error(500, event)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if first is None:
                            first = time.perf_counter() - start
                        pieces.append(piece)
                        yield piece
                    finish = choice.get("finish_reason") or finish
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._lost(exc) from None
        finally:
            conn.close()
        if finish is None or usage is None:
            raise IdeficsError("model_error", f"the server at {self.url} ended the answer early", SERVER_HINT)
        total = time.perf_counter() - start
        inputs.usage[0] = _prompt_usage(usage)
        return RemoteGeneration(text="".join(pieces), completion_tokens=int(usage.get("completion_tokens", 0)),
                                finish_reason=finish, first_token_s=total if first is None else first,
                                total_s=total, prompt_usage=inputs.usage[0])

    def generate(self, inputs: RemoteInputs, max_new_tokens: int | None = None, logits_processor=None):
        return self.generate_batch(inputs, max_new_tokens, logits_processor)[0]

    def generate_batch(self, inputs: RemoteInputs, max_new_tokens: int | None = None,
                       logits_processor=None) -> list[RemoteGeneration]:
        """Every row's answer, the rows sent at once (the server batches them); the first error is raised."""
        _no_logits_processor(logits_processor)
        start = time.perf_counter()

        def one(row: int):
            try:
                return self._json("POST", "/v1/chat/completions", self._body(inputs.rows[row], max_new_tokens))
            except IdeficsError as err:
                return err

        with ThreadPoolExecutor(max(1, len(inputs.rows)), thread_name_prefix="idefics-client") as pool:
            answers = list(pool.map(one, range(len(inputs.rows))))
        elapsed = time.perf_counter() - start
        for answer in answers:
            if isinstance(answer, IdeficsError):
                raise answer
        out = []
        for row, answer in enumerate(answers):
            try:
                choice, usage = answer["choices"][0], answer["usage"]
                text, finish = choice["message"]["content"] or "", choice["finish_reason"]
            except (KeyError, IndexError, TypeError):
                raise IdeficsError("model_error", f"the server at {self.url} sent an answer that is not a chat "
                                   "completion", SERVER_HINT) from None
            inputs.usage[row] = _prompt_usage(usage)
            out.append(RemoteGeneration(text=text, completion_tokens=int(usage.get("completion_tokens", 0)),
                                        finish_reason=finish, first_token_s=None, total_s=elapsed,
                                        prompt_usage=inputs.usage[row]))
        return out

    # ---- HTTP ----------------------------------------------------------------------------------
    def _body(self, messages: list[dict], max_new_tokens: int | None, stream: bool = False) -> bytes:
        body = {"model": self.model_id, "messages": messages,
                "max_tokens": max_new_tokens or self.options.max_new_tokens}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return json.dumps(body).encode()  # ASCII: text the server cannot take (a lone surrogate) is its 400, not ours

    def _models(self) -> dict:
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            try:
                listing = self._json("GET", "/v1/models")
            except _Loading:
                if time.monotonic() > deadline:
                    raise IdeficsError("model_error", f"the server at {self.url} is still loading its model after "
                                       f"{LOAD_WAIT_S:.0f} s", SERVER_HINT) from None
                time.sleep(0.25)
                continue
            data = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(data, list) or not data or not isinstance(data[0], dict):
                raise IdeficsError("model_error", f"{self.url} is not an `idefics serve` server (no model in "
                                   "/v1/models)", SERVER_HINT)
            return data[0]

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc) from None
        conn.sock.settimeout(None)  # an answer may take long to start (a prefill over many pages): no read timeout
        return conn

    def _send(self, method: str, path: str, body: bytes | None):
        """(connection, response) of one request whose status is 200; retried while the server is overloaded."""
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "idefics-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + OVERLOAD_WAIT_S
        while True:
            conn = self._connection()
            try:
                conn.request(method, self._root + path, body=body, headers=headers)
                resp = conn.getresponse()
                if resp.status == 200:
                    return conn, resp
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise self._lost(exc) from None
            conn.close()
            err = self._error(resp.status, raw)
            if isinstance(err, _Overloaded) and time.monotonic() < deadline:
                time.sleep(_retry_after(resp.getheader("Retry-After")))
                continue
            raise err

    def _post(self, body: bytes):
        return self._send("POST", "/v1/chat/completions", body)

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict:
        conn, resp = self._send(method, path, body)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._lost(exc) from None
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except ValueError:
            raise IdeficsError("model_error", f"{self.url} answered {path} with something that is not JSON",
                               SERVER_HINT) from None

    # ---- errors ----------------------------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> IdeficsError:
        if isinstance(exc, socket.timeout):
            why = f"no answer within {CONNECT_TIMEOUT_S:g} s"
        elif isinstance(exc, socket.gaierror):
            why = f"unknown host {self._host}"
        else:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return IdeficsError("model_error", f"cannot reach the idefics server at {self.url}: {why}", SERVER_HINT)

    def _lost(self, exc: BaseException) -> IdeficsError:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return IdeficsError("model_error", f"lost the connection to the idefics server at {self.url}: {why}",
                            SERVER_HINT)

    def _error(self, status: int, raw) -> IdeficsError:
        """The server's OpenAI error object as the CLI's error (its code kept where the CLI has it)."""
        obj = raw
        if isinstance(raw, bytes):
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
        error = obj.get("error") if isinstance(obj, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        message = (error.get("message") if isinstance(error, dict) else None) or f"HTTP {status}"
        message = str(message).replace("\n", " ")[:500]
        if status == 401 or code == "invalid_api_key":
            return IdeficsError("model_error", f"the server at {self.url} refused the API key", KEY_HINT)
        if status == 503 and code == "loading":
            return _Loading("model_error", f"the server at {self.url} is still loading its model")
        if code == "overloaded":
            return _Overloaded("model_error", f"the server at {self.url} is overloaded: {message}",
                               "try again later, or start it with a larger --max-queue")
        if code == "request_too_large":
            return UsageError(f"the pages are too large for the server at {self.url}: {message}",
                              "choose fewer pages (--pages), or start the server with a larger --max-request-mb")
        if code in _CLIENT_CODES and code != "model_error":
            return IdeficsError(code, message)
        return IdeficsError("model_error", f"the server at {self.url} failed: {message}", SERVER_HINT)


class _Loading(IdeficsError):
    """503 `loading`: the server is up, its model not yet."""


class _Overloaded(IdeficsError):
    """503 `overloaded`: the server's queue is full (retried after its Retry-After)."""


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.1), 10.0)
    except (TypeError, ValueError):
        return 1.0


def _no_logits_processor(logits_processor) -> None:
    if logits_processor is not None:
        raise UsageError("a logits processor cannot run through a server", "run without --server")


def _prompt_usage(usage: dict) -> dict:
    details = usage.get("prompt_tokens_details") or {}
    return {"prompt_tokens": usage.get("prompt_tokens"), "image_tokens": details.get("image_tokens")}


def _events(resp):
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def png_data_url(image) -> str:
    """A page image as a lossless PNG data: URL: the same RGB pixels, no colour profile, no transparency chunk.

    The server decodes it with documents.py, which gives these pixels back unchanged (an RGB image of 2 px or
    more a side needs no conversion), so the processor sees what it sees in a local run.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1, icc_profile=None, transparency=None)
    return "data:image/png;base64," + base64.b64encode(buf.getbuffer()).decode("ascii")


def _image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}}
