"""HTTP to a running `idefics serve`: connections, retries, server-sent events and errors as the CLI's errors.

Contract: `normalize_url(url)` gives the server's root URL (else `UsageError`). `Transport(url, api_key)`: `send`
(connection, response of a 200), `json` (its body, within JSON_TIMEOUT_S); unreachable (CONNECT_TIMEOUT_S) or lost
is a `model_error`, and so is a stream silent for `stream_idle_s()` (`StalledAnswer`); 503 `overloaded` is retried
for OVERLOAD_WAIT_S; an `InFlight`'s requests are given up at once (Ctrl-C). `error(status, body)` maps OpenAI's
error object to the CLI's (`ServerLoading`, `Overloaded`, `UsageError`, its own codes). `events(resp)`: a stream's
JSON objects. Stdlib only.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.parse

from ..errors import EXIT_FOR_CODE, IdeficsError, StalledAnswer, UsageError
from ..process import env_seconds

CONNECT_TIMEOUT_S = 1.5  # a server that does not answer the connection: model_error well within 2 s
JSON_TIMEOUT_S = 30.0  # /v1/models and /health answer at once, even while the model loads: past this, no server
OVERLOAD_WAIT_S = 120.0  # how long a request is retried while the server's queue is full
# a streamed answer that sends not a byte for this long (IDEFICS_STREAM_IDLE_S) is given up: `idefics serve` sends
# `: ping` every 15 s while a request waits, prefills or is held up (serve/app.py PING_S)
STREAM_IDLE_S = 120.0
SERVER_HINT = "start it with `idefics serve`, or check --server / IDEFICS_SERVER"
KEY_HINT = "pass --api-key KEY or set IDEFICS_API_KEY: the key `idefics serve` was started with"
_CLIENT_CODES = set(EXIT_FOR_CODE) - {"internal", "interrupted"}
LOST = (OSError, http.client.HTTPException)  # what a dropped connection raises while reading


class InFlight:
    """The requests that threads make for one caller, who may give them all up at once (`cancel`: a Ctrl-C, a closed
    generator): their sockets are shut, so a thread reading one (from a stalled server) returns at once."""

    def __init__(self):
        self.socks, self.cancelled = {}, threading.Event()  # socks: each thread's latest (a response may hold it)

    def cancel(self) -> None:
        self.cancelled.set()
        for sock in list(self.socks.values()):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ServerLoading(IdeficsError):
    """503 `loading`: the server is up, its model not yet."""


class Overloaded(IdeficsError):
    """503 `overloaded`: the server's queue is full (retried after its Retry-After)."""


def normalize_url(url: str) -> str:
    """`host:port`, `http://host:port/`, or an OpenAI base URL ending in /v1: the server's root URL."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/").removesuffix("/v1")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an IPv6 address with no closing bracket
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() or not c.isprintable()
                                                                           for c in url):
        raise UsageError(f"--server {url!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UsageError(f"--server {url!r} has a bad port", "e.g. --server http://127.0.0.1:8000") from None
    if "@" in parts.netloc:  # user:password@ is never sent (the API key is): dropped, so no message prints it
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return url


class Transport:
    """Requests to one server (see the module contract)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = normalize_url(url)
        self.api_key = api_key or None
        if self.api_key and not (self.api_key.isprintable() and max(map(ord, self.api_key)) < 256):  # (http.client)
            raise UsageError("the API key has a character an HTTP header cannot carry (a line break, a control "
                             "character, a letter past Latin-1)", "a key file from Windows ends in \\r: " + KEY_HINT)
        parts = urllib.parse.urlsplit(self.url)
        self._https, self._host, self._port, self._root = (parts.scheme == "https", parts.hostname, parts.port,
                                                           parts.path)

    def _connection(self, live: InFlight, timeout: float | None) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection  # https: verified
        conn = kind(self._host, self._port, timeout=CONNECT_TIMEOUT_S, blocksize=2**16)
        try:
            conn.connect()
        except LOST as exc:
            conn.close()
            raise self.lost(exc, "cannot reach") from None
        live.socks[threading.get_ident()] = conn.sock
        if live.cancelled.is_set():  # after the socket is known: a cancel either sees it or is seen here
            conn.close()
            raise IdeficsError("interrupted", f"the request to {self.url} was given up")
        conn.sock.settimeout(timeout)
        return conn

    def send(self, method: str, path: str, body: bytes | None = None, live: InFlight | None = None,
             timeout: float | None = None, stream: bool = False):
        """(connection, response) of one request whose status is 200; retried while the server is overloaded.
        `timeout`: the longest wait for each read (None: no limit); `stream`: past it, a `StalledAnswer`."""
        live = live or InFlight()
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "idefics-cli"}
        if body is not None:
            headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        deadline = time.monotonic() + OVERLOAD_WAIT_S
        while True:
            conn = self._connection(live, timeout)
            try:
                # the body as a file: sent a block at a time, so `timeout` bounds each block, not the whole upload
                conn.request(method, self._root + path, body=body and io.BytesIO(body), headers=headers)
                resp = conn.getresponse()
                if resp.status == 200:
                    return conn, resp
                raw = resp.read()
            except LOST as exc:
                conn.close()
                raise self.lost(exc, waited=timeout, stream=stream) from None
            conn.close()
            if 300 <= resp.status < 400 and resp.getheader("Location"):  # http:// to https://: not followed
                raise IdeficsError("model_error", f"the server at {self.url} redirects {path} to "
                                   f"{resp.getheader('Location')[:300]}", "pass the URL it redirects to as --server")
            err = self.error(resp.status, raw)
            if isinstance(err, Overloaded) and time.monotonic() < deadline:
                live.cancelled.wait(retry_after(resp.getheader("Retry-After")))
                continue
            raise err

    def json(self, method: str, path: str, body: bytes | None = None) -> dict:
        conn, resp = self.send(method, path, body, timeout=JSON_TIMEOUT_S)
        try:
            raw = resp.read()
        except LOST as exc:
            raise self.lost(exc, waited=JSON_TIMEOUT_S) from None
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
            raise IdeficsError("model_error", f"{self.url} answered {path} with something that is not JSON",
                               SERVER_HINT) from None

    # ---- errors ----------------------------------------------------------------------------------
    def lost(self, exc: BaseException, what: str = "lost the connection to", waited: float | None = None,
             stream: bool = False) -> IdeficsError:
        """A connection refused (`what`: "cannot reach"), timed out (`waited` s for an answer; a `stream`'s is a
        `StalledAnswer`) or dropped, as a `model_error`."""
        if stream and isinstance(exc, socket.timeout):
            return StalledAnswer("model_error", f"the idefics server at {self.url} sent nothing for {waited:g} s",
                                 "it is stuck, or a proxy holds the connection; IDEFICS_STREAM_IDLE_S sets the wait")
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout):
            why = f"no answer within {waited or CONNECT_TIMEOUT_S:g} s"
        elif isinstance(exc, socket.gaierror):
            why = f"unknown host {self._host}"
        elif getattr(exc, "reason", None) == "WRONG_VERSION_NUMBER":  # ssl.SSLError: a plain HTTP answer to TLS
            why = "it does not speak TLS (https): is it http://?"
        return IdeficsError("model_error", f"{what} the idefics server at {self.url}: {why}", SERVER_HINT)

    def error(self, status: int, raw) -> IdeficsError:
        """The server's OpenAI error object as the CLI's error (its code kept where the CLI has it)."""
        try:
            obj = json.loads(raw) if isinstance(raw, bytes) else raw
        except (ValueError, RecursionError):
            obj = None
        error = obj.get("error") if isinstance(obj, dict) else None
        error = error if isinstance(error, dict) else {}
        code = error.get("code") if isinstance(error.get("code"), str) else None  # a list's `in` would raise
        message = str(error.get("message") or f"HTTP {status}").replace("\n", " ")[:500]
        if status == 401 or code == "invalid_api_key":
            return IdeficsError("model_error", f"the server at {self.url} refused the API key", KEY_HINT)
        if status == 503 and code == "loading":
            return ServerLoading("model_error", f"the server at {self.url} is still loading its model")
        if code == "overloaded" or status == 429:  # 429: a gateway's rate limit, retried as a full queue is
            return Overloaded("model_error", f"the server at {self.url} is overloaded: {message}",
                              "try again later, or start it with a larger --max-queue")
        if code == "request_too_large" or status == 413:  # 413 alone: a proxy's body limit (nginx: 1 MiB)
            return UsageError(f"the pages are too large for the server at {self.url}: {message}",
                              "choose fewer pages (--pages), or raise the server's --max-request-mb (or its proxy's "
                              "body limit)")
        if code in _CLIENT_CODES and code != "model_error":
            return IdeficsError(code, message)
        return IdeficsError("model_error", f"the server at {self.url} failed: {message}", SERVER_HINT)


def stream_idle_s() -> float:
    """How long a streamed answer may send nothing (no piece, no `: ping`) before it is given up."""
    return env_seconds("IDEFICS_STREAM_IDLE_S", STREAM_IDLE_S)


def retry_after(value: str | None) -> float:
    """Seconds to wait before retrying an overloaded server: its Retry-After, within 0.1 to 10 s (1 s if none)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 1.0
    return 1.0 if math.isnan(seconds) else min(max(seconds, 0.1), 10.0)


def events(resp):
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    for line in iter(resp.readline, b""):
        line = line.strip()
        if line.startswith(b"data:"):
            if line[5:].strip() == b"[DONE]":
                return
            yield json.loads(line[5:])
