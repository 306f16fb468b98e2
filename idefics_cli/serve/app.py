"""The ASGI app (FastAPI as plain routes): OpenAI-compatible chat completions, models, health and metrics.

Contract (in full: docs/serve.md): `build_app(config, state)` returns the app; its lifespan loads the model in a
thread (`state.loader`; until then 503 `loading`, a failure sets `state.error` and calls `state.on_fatal()`), then
sizes the prefix cache, starts a `Scheduler` and logs `ready` (`state.log`). Every error is OpenAI's `{"error":
{...}}` with the CLI's codes; one access-log line per request on stderr: `METHOD PATH STATUS tokens=N S.SSSs`.
A stream sends `: ping` whenever it has sent nothing for PING_S (a request queued that long is answered 200 then).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import StarletteHTTPException as HTTPException
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..errors import IdeficsError, UsageError, classify
from ..process import env_seconds
from .cache import PrefixCache
from .config import ServeConfig, default_cache_bytes
from .metrics import Metrics
from .requests import RequestError, parse
from .scheduler import Job, QueueFull, Scheduler, describe, prompt_ids

LOG_KEY = "idefics.log"
# a stream that has sent nothing for this long (IDEFICS_SSE_PING_S) sends `: ping` (an SSE comment, which clients
# skip): while it waits in the queue, during its prefill, or held up by other rows' prefills; so one not started by
# then starts at once (its errors then come as its last event). `--server` clients give up after 120 s of silence.
PING_S = 15.0
PING = b": ping\n\n"


@dataclass
class ServerState:
    loader: object = None  # () -> engine
    engine: object = None
    scheduler: object = None
    # what source pages (document sha256, page, render size) decoded to, as cache.Seen: the last 4096
    pages: object = field(default_factory=lambda: PrefixCache(4096, size=lambda seen: 1))
    status: str = "loading"  # loading | ok | error | stopping
    error: IdeficsError | None = None
    model_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    log: object = None  # (line) -> None
    on_fatal: object = None
    per_image: int = 0  # the least tokens a page adds to a prompt
    base_tokens: int = 0  # the chat template's tokens with no page and no text
    metrics: Metrics | None = None  # set by build_app; the scheduler reports each job's end to it


def error_response(status: int, code: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            405: "invalid_request_error", 413: "invalid_request_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": param}}, status,
                        headers=headers)


def _from_error(err: IdeficsError) -> JSONResponse:
    param = getattr(err, "param", None)
    message = f"{param}: {err.message}" if param and err.code != "usage" else err.message
    if err.hint:
        message += f" ({err.hint})"
    if err.code == "out_of_memory":
        return error_response(503, err.code, message, param, {"Retry-After": "5"})
    if err.code in ("generation_error", "model_error", "internal"):
        return error_response(500, err.code, message, param)
    return error_response(400, err.code, message, param)


def access_log(app, metrics: Metrics):
    """ASGI middleware: one line per HTTP request on stderr once its response has ended; /v1/* counted by status."""

    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start = time.perf_counter()
        record = scope[LOG_KEY] = {"status": 0, "tokens": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        except BaseException:
            record["status"] = record["status"] or 500
            raise
        finally:
            if record["status"] and scope["path"].startswith("/v1/"):
                metrics.requests.labels(str(record["status"])).inc()
            line = (f"{scope['method']} {scope['path']} {record['status'] or '-'} tokens={record['tokens']} "
                    f"{time.perf_counter() - start:.3f}s")
            print(line, file=sys.stderr, flush=True)

    return logged


def build_app(config: ServeConfig, state: ServerState) -> FastAPI:
    key = config.api_key.encode() if config.api_key else None
    metrics = state.metrics = Metrics(state)
    ping_s = env_seconds("IDEFICS_SSE_PING_S", PING_S)
    # requests decoded and rendered at once: more would only take CPU (and the GIL) from the batch that generates,
    # and hold more rendered pages in memory
    preparing = asyncio.Semaphore(max(1, min(4, (os.cpu_count() or 2) // 2)))

    def refused(request: Request, ready: bool = True) -> JSONResponse | None:
        """401 without the API key; with `ready`, 503 unless the model is loaded and the server not stopping."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is not None and not (hmac.compare_digest(given.strip().encode(), key) and scheme.lower() == "bearer"):
            return error_response(401, "invalid_api_key", "missing or wrong API key (send Authorization: Bearer KEY)",
                                  headers={"WWW-Authenticate": "Bearer"})
        if not ready or state.status == "ok":
            return None
        if state.status == "stopping":
            return error_response(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "5"})
        if state.status == "error":
            return error_response(503, "model_error", state.error.message if state.error else "model failed")
        return error_response(503, "loading", "the model is still loading", headers={"Retry-After": "5"})

    async def health(request: Request) -> JSONResponse:
        body = {"status": state.status, "model": state.model_id}
        if state.scheduler is not None:
            body.update(state.scheduler.load())
        return JSONResponse(body, 200 if state.status == "ok" else 503)

    async def models(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        info = {**describe(state.engine), "max_request_mb": config.max_request_mb,
                "context_size": state.engine.context_size, "prompt_tokens": state.base_tokens,
                "page_tokens": state.per_image}
        return JSONResponse({"object": "list", "data": [{"id": state.model_id, "object": "model",
                                                         "created": state.created, "owned_by": "idefics-cli",
                                                         "idefics": info}]})

    async def read_json(request: Request):
        """The body's JSON value, or the error response (413 over --max-request-mb, 400 not JSON)."""
        limit = int(config.max_request_mb * 2**20)
        too_big = error_response(413, "request_too_large", f"the request is over --max-request-mb "
                                 f"{config.max_request_mb:g} MiB", headers={"Connection": "close"})
        length = request.headers.get("content-length", "")
        drain = max(4 * limit, 16 * 2**20)  # read (and drop) this much of a body that is too big, so that the
        if length.isdigit() and int(length) > drain:  # client, still sending, gets the 413 and not a reset
            return too_big
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > drain:
                    return too_big
                if size <= limit:
                    chunks.append(chunk)
        except ClientDisconnect:  # gone before its body was sent: logged and counted as 499
            return _gone()
        if size > limit:
            return too_big
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            return error_response(400, "usage", "the request body is not valid JSON")

    async def chat(request: Request) -> Response:
        record = request.scope.get(LOG_KEY, {})
        if (refusal := refused(request)) is not None:
            return refusal
        scheduler = state.scheduler
        if scheduler.busy():
            return error_response(503, "overloaded", "too many requests are waiting", headers={"Retry-After": "1"})
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        loop = asyncio.get_running_loop()
        try:
            async with preparing:
                req, job = await asyncio.to_thread(_prepare, state, body, loop)
        except IdeficsError as err:
            return _from_error(err)
        metrics.pages.inc(len(job.images))
        try:
            scheduler.submit(job)
        except QueueFull as exc:
            code = "shutting_down" if scheduler.stopping else "overloaded"
            return error_response(503, code, str(exc), headers={"Retry-After": "1"})
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_id}
        image_token, streamed = state.engine.image_token_id, None
        try:
            kind, payload = await _next(job, ping_s if req.stream else None)
            if kind == "done":  # cancelled before it started (the client went away, or stopping)
                return _shed() if job.shed else _gone()
            if kind != "error" and req.stream:  # started, or waiting still (None); the stream ends job and watcher
                streamed = StreamingResponse(_stream(job, req, meta, record, watcher, image_token, kind, ping_s),
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                return streamed
            while kind not in ("error", "done"):
                kind, payload = await job.events.get()
        finally:
            if streamed is None:
                watcher.cancel()
                job.cancel()
        record["tokens"] = len(job.token_ids)
        if kind == "error":
            return _from_error(payload)
        if job.shed:
            return _shed()
        if job.finish_reason == "cancelled":
            return _gone()
        return JSONResponse({**meta, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": job.text},
             "logprobs": _logprobs(job.logprob_content() if req.logprobs else None),
             "finish_reason": _finish(job)}], "usage": _usage(job, image_token)})

    async def scrape(request: Request) -> Response:
        if (refusal := refused(request, ready=False)) is not None:
            return refusal
        body, kind = metrics.render()
        return Response(body, headers={"Content-Type": kind})

    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        import traceback

        if os.environ.get("IDEFICS_DEBUG"):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"internal error in {request.url.path}: {type(exc).__name__}: {str(exc)[:300]}".replace("\n", " "),
              file=sys.stderr, flush=True)
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

    middleware = [Middleware(access_log, metrics=metrics)]
    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=[config.cors], allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    # FastAPI without its request models and docs: OpenAI bodies are loose, and a bad one must get OpenAI's error
    # object with the CLI's codes (requests.py), not a 422; plain Starlette-style routes do exactly that
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, middleware=middleware,
                  lifespan=lambda _: _lifespan(state, config),
                  exception_handlers={HTTPException: not_found, Exception: internal})
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/metrics", scrape, methods=["GET"])
    return app


def _prepare(state: ServerState, body, loop):
    """Parse, tokenize, check the context and render (a worker thread: none of it runs on the event loop)."""
    engine = state.engine
    context = engine.context_size
    req = parse(body, max_images=(context // state.per_image) if context and state.per_image else None,
                longest_side=engine.render_side)
    try:
        max_tokens = req.max_tokens or engine.options.max_new_tokens
        memo = state.pages if state.scheduler.cache.max_bytes else None  # no prefix cache: no digests to keep
        images, digests = req.render(memo)  # first: a family's image tokens may follow each page's size
        try:
            ids = prompt_ids(engine, req.messages, images)
            engine.fit_context(len(ids), max_tokens, "the prompt", "send fewer pages or turns")
        except UsageError as err:  # the OpenAI error names the parameter
            raise RequestError(err.code, err.message, "messages", err.hint) from None
        job = Job(ids, images, max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                  stop=req.stop, loop=loop, schema=req.schema, logprobs=req.logprobs, top_logprobs=req.top_logprobs)
        job.digests = digests
        if req.pages and not state.scheduler.lookup(job):  # pages seen before, their prefix no longer cached
            job.images = req.render()[0]
    finally:
        req.close()
    return req, job


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body is read: the next message is the disconnect)."""
    while not job.done:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _shed() -> JSONResponse:
    return error_response(503, "shutting_down", "the server stopped before the answer ended",
                          headers={"Retry-After": "5"})


def _gone() -> JSONResponse:
    """The client went away before its answer: logged and counted as nginx's 499."""
    return error_response(499, "cancelled", "the client closed the request")


def _finish(job: Job) -> str:
    return job.finish_reason if job.finish_reason in ("stop", "length") else "stop"


def _usage(job: Job, image_token: int) -> dict:
    """OpenAI's usage; `prompt_tokens_details.image_tokens` (ours) as `ask --json` counts them."""
    prompt, completion = len(job.ids), len(job.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens, "image_tokens": job.ids.count(image_token)}}


def _logprobs(content: list | None) -> dict | None:
    return None if content is None else {"content": content, "refusal": None}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _next(job: Job, ping_s: float | None) -> tuple:
    """The job's next event, or (None, None) after `ping_s` without one."""
    try:
        return await asyncio.wait_for(job.events.get(), ping_s)  # a get cancelled by the timeout takes no event
    except asyncio.TimeoutError:
        return None, None


async def _stream(job: Job, req, meta: dict, record: dict, watcher, image_token: int, kind: str | None,
                  ping_s: float):
    """The server-sent events from the job's first event `kind` ("start", or None: not started yet) on."""
    chunk, payload = {**meta, "object": "chat.completion.chunk"}, None
    try:
        while True:
            if kind is None:  # nothing to send for ping_s
                yield PING
            elif kind == "start":
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            elif kind == "delta":
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": payload[0]},
                                                  "logprobs": _logprobs(payload[1]), "finish_reason": None}]})
            elif kind == "error" or kind == "done" and job.shed:
                yield _sse(json.loads((_from_error(payload) if kind == "error" else _shed()).body))
                break
            elif kind == "done":
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": _logprobs(payload),
                                                  "finish_reason": _finish(job)}]})
                if req.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(job, image_token)})
                break
            kind, payload = await _next(job, ping_s)
            record["tokens"] = len(job.token_ids)
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()
        watcher.cancel()


@asynccontextmanager
async def _lifespan(state: ServerState, config: ServeConfig):
    task = asyncio.create_task(asyncio.to_thread(_load, state, config))
    try:
        yield
    finally:
        state.status = "stopping"
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop, True, 30)
        task.cancel()


def _load(state: ServerState, config: ServeConfig) -> None:
    try:
        engine = state.engine = state.loader()
        state.model_id = describe(engine)["id"]
        state.base_tokens = engine.prompt_tokens(0, "")
        state.per_image = engine.prompt_tokens(1, "") - state.base_tokens
        size = int(config.cache_mb * 2**20) if config.cache_mb is not None else default_cache_bytes(engine.device)
        state.scheduler = Scheduler(engine, PrefixCache(size), config.max_batch, config.max_queue,
                                    on_end=state.metrics.ended)
        state.scheduler.start()
        state.log(f"ready ({state.model_id}; batch {config.max_batch}, queue {config.max_queue}, "
                  f"prefix cache {size / 2**20:.0f} MiB)")
        state.status = "ok"
    except BaseException as exc:  # noqa: BLE001 - reported, and the server exits
        state.error = classify(exc, stage="load")
        if state.error.code == "corrupt":
            state.error.code = "model_error"
        state.status = "error"
        state.on_fatal()
