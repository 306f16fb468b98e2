"""The client: a running `idefics serve` as an engine (interface.Engine), with no torch in this process.

Contract: `RemoteEngine(url, api_key, max_new_tokens)` reads the server's model card (waiting LOAD_WAIT_S while it
loads; `render_side`: the px to render PDF pages at). `prepare` sends pages as lossless data: URLs (TIFF within
`tiff_budget`, then PNG); every row is one streamed request (its usage and logprobs the server's). Errors keep
the CLI's codes; a 503 `overloaded` is retried (transport.py); a lost connection is `model_error`, and so is a stream
that sends nothing for `stream_idle_s()` (`StalledAnswer`: transcribe and chat go on after it).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import accumulate, islice

from ..errors import IdeficsError, UsageError
from ..interface import Generation, ModelOptions
from .transport import LOST, SERVER_HINT, InFlight, ServerLoading, Transport, events, stream_idle_s

LOAD_WAIT_S = 600.0  # how long a request waits for a server that is still loading its model
MAX_BATCH = 256  # serve's largest --max-batch: a /health saying more would have every page rendered and sent at once
QUANT_OPTIONS = {"nf4": "4bit", "int8": "8bit", "none": "none"}  # engine.QUANT_NAMES, reversed
TIFF_BUDGET = 8 * 2**20  # PackBits TIFF bytes per request at most (10.7 MiB as base64); past it, pages go as PNG


def _asked_quant(info: dict) -> str:
    """The `--quant` the server was started with, as a local run's settings hash holds it: `auto` when it chose."""
    if str(info.get("quantization_reason") or "").startswith("auto"):
        return "auto"
    return QUANT_OPTIONS.get(info["quantization"], "4bit")


class RemoteInputs:
    """One request per row: the OpenAI messages (pages as data: URLs); `usage` per row once answered."""

    def __init__(self, rows: list[list[dict]]):
        self.rows, self.usage = rows, [None] * len(rows)


class RemoteEngine:
    """A running server's model (interface.Engine)."""

    def __init__(self, url: str, api_key: str | None = None, max_new_tokens: int | None = None):
        self.http = Transport(url, api_key)
        self.url = self.http.url
        start = time.perf_counter()
        card = self._models()
        self.load_s = time.perf_counter() - start  # what a local run spends loading: here, reaching the server
        self.model_id = card.get("id") if isinstance(card.get("id"), str) else ""
        described = card.get("idefics")
        if not isinstance(described, dict) or not isinstance(described.get("quantization"), str):
            raise IdeficsError("model_error", f"{self.url} is not an `idefics serve` server (no model settings in "
                               "/v1/models)", SERVER_HINT)
        self.render_side = _count(described.get("render_side"))  # absent (an older server): the default
        # the server's context, its template's tokens and the least a page adds; absent: left to the server
        self.context = tuple(_count(described.get(k)) for k in ("context_size", "prompt_tokens", "page_tokens"))
        self.doctags = described.get("doctags") is True  # a document model: its own prompt, Markdown in records
        self._info = {k: described.get(k) if isinstance(described.get(k), str) else None  # odd types: unknown
                      for k in ("id", "revision", "quantization", "quantization_reason", "dtype", "device", "family")}
        self.options = ModelOptions(model=self._info["id"] or self.model_id, revision=self._info["revision"],
                                    quant=_asked_quant(self._info),
                                    dtype=self._info["dtype"] or "auto", device=self._info["device"] or "auto",
                                    offline=True, split=bool(described.get("split", True)),
                                    max_new_tokens=max_new_tokens or ModelOptions().max_new_tokens)
        cap = described.get("max_request_mb")
        known = isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0
        self.tiff_budget = int(min(TIFF_BUDGET, cap * 2**18)) if known else 0  # TIFF bytes per request (inf: no cap)

    @property
    def info(self) -> dict:
        return dict(self._info)

    def __repr__(self) -> str:
        return f"<RemoteEngine {self.url} {self.options.model}>"

    # ---- interface.Engine: what ask, chat and transcribe use ---------------------------------------
    def check_context(self, n_images: int, question: str, max_new_tokens: int) -> None:
        """Refuse up front (UsageError, as a local engine) when the pages alone and `max_new_tokens` cannot fit the
        context the server's card gives (the text is not counted: no tokenizer here); the rest is left to the
        server, which refuses a prompt over the context (`usage`) before rendering."""
        size, base, per = self.context
        base = base or 0
        if size and per and base + n_images * per + max_new_tokens > size:
            raise UsageError(f"{n_images} page images needs at least {base + n_images * per} prompt tokens + "
                             f"{max_new_tokens} new tokens, more than the model's context of {size}",
                             f"at most {max((size - max_new_tokens - base) // per, 0)} pages fit: narrow --pages")

    def auto_batch_size(self) -> int:
        """Pages a transcription sends at once: the server's --max-batch (rows it decodes together; 256 at most)."""
        try:
            health = self.http.json("GET", "/health")
        except IdeficsError:
            return 4
        size = health.get("max_batch") if isinstance(health, dict) else None
        return min(size, MAX_BATCH) if isinstance(size, int) and size > 0 else 4

    def prepare(self, batch: list[tuple[list, str]], split: bool | None = None, collect: bool = False):
        """One request per (images, question), pages first; images may be functions rendering one. `split` is the
        server's (ignored here)."""
        rows = []
        for images, question in batch:
            budget = [self.tiff_budget]
            parts = [_image_part(image() if callable(image) else image, budget) for image in images]
            rows.append([{"role": "user", "content": [*parts, {"type": "text", "text": question}]}])
        return RemoteInputs(rows)

    def chat_inputs(self, messages: list[dict], images: list, max_new_tokens: int) -> RemoteInputs:
        """The whole conversation (transformers chat format, `{"type": "image"}` in page order) as one request."""
        live = {id(image) for image in images}  # the cache: id(image) -> (image, part, TIFF bytes), encoded once
        cache = self._chat_urls = {k: v for k, v in getattr(self, "_chat_urls", {}).items() if k in live}
        budget = [self.tiff_budget - sum(entry[2] for entry in cache.values())]  # the request sends them all
        urls = iter(images)
        out = []
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in content if isinstance(content, list) else ():
                if part.get("type") == "image":
                    image = next(urls)
                    if id(image) not in cache:
                        before = budget[0]
                        part = _image_part(image, budget)
                        cache[id(image)] = (image, part, before - budget[0])
                    parts.append(cache[id(image)][1])
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
            out.append({"role": message["role"], "content": parts})
        return RemoteInputs([out])

    def usage(self, inputs: RemoteInputs, row: int = 0) -> dict:
        """{"prompt_tokens", "image_tokens"} as the server counted them (None until the row is answered)."""
        return dict(inputs.usage[row] or {"prompt_tokens": None, "image_tokens": None})

    def stream_generate(self, inputs: RemoteInputs, max_new_tokens: int | None = None, logits_processor=None,
                        schema=None):
        """Yield the (one-row) answer's pieces as they stream, then return its Generation; closing the generator
        closes the connection, which cancels the generation."""
        _local_only(logits_processor)
        return (yield from self._stream(inputs, 0, max_new_tokens, schema, "a stream"))

    def generate_batch(self, inputs: RemoteInputs, max_new_tokens: int | None = None, logits_processor=None,
                       schema=None) -> list[Generation]:
        """Every row's answer, the rows sent at once (the server batches them); the first error is raised."""
        _local_only(logits_processor)
        rows = range(len(inputs.rows))
        answers = dict(self.generate_rows(((row, inputs, row) for row in rows), max_new_tokens, schema, len(rows) or 1))
        out = [answers[row] for row in rows]
        for answer in out:
            if isinstance(answer, IdeficsError):
                raise answer
        return out

    def generate_rows(self, items, max_new_tokens: int | None = None, schema=None, width: int | None = None):
        """(tag, inputs, row) items answered up to `width` requests at once, the next sent as one ends; yields
        (tag, Generation or IdeficsError) as answers arrive."""
        pending = iter(items)
        running: dict = {}
        width = max(1, width or self.auto_batch_size())
        pool, live = ThreadPoolExecutor(width, thread_name_prefix="idefics-client"), InFlight()
        try:
            while True:
                for tag, inputs, row in islice(pending, width - len(running)):
                    running[pool.submit(self._answer, inputs, row, max_new_tokens, schema, live)] = tag
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()
        finally:  # an error, Ctrl-C or a closed generator: the requests still running are given up, not waited for
            live.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _answer(self, inputs: RemoteInputs, row: int, max_new_tokens: int | None, schema, live: InFlight):
        """One row's answer (its stream read to the end), or its IdeficsError."""
        stream = self._stream(inputs, row, max_new_tokens, schema, "an answer", live)
        try:
            while True:
                next(stream)
        except StopIteration as end:
            return end.value
        except IdeficsError as err:
            return err

    def _stream(self, inputs: RemoteInputs, row: int, max_new_tokens: int | None, schema, what: str,
                live: InFlight | None = None):
        """Yield a row's pieces as the server streams them; return its Generation (`what`: its name in errors)."""
        start, idle = time.perf_counter(), stream_idle_s()  # a server sends `: ping` while it has nothing to send
        conn, resp = self.http.send("POST", "/v1/chat/completions", self._body(inputs.rows[row], max_new_tokens,
                                                                               schema), live, idle, stream=True)
        pieces, first, finish, usage, tokens = [], None, None, None, []
        try:
            if "text/event-stream" not in (resp.getheader("Content-Type") or "").lower():
                raise TypeError  # a proxy's HTML page, an answer not streamed: no stream to read
            for event in events(resp):
                if isinstance(event, dict) and "error" in event:
                    raise self.http.error(500, event)
                piece, finish_reason, logprobs, chunk_usage = _chunk(event)
                usage, finish = chunk_usage or usage, finish_reason or finish
                tokens += logprobs
                if piece:
                    first = time.perf_counter() - start if first is None else first
                    pieces.append(piece)
                    yield piece
        except (*MALFORMED, json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # not JSON, or no completion
            raise IdeficsError("model_error", f"the server at {self.url} sent {what} that is not a chat completion",
                               SERVER_HINT) from None
        except (*LOST, ValueError) as exc:
            raise self.http.lost(exc, waited=idle, stream=True) from None
        finally:
            conn.close()
        if finish is None or usage is None:
            raise IdeficsError("model_error", f"the server at {self.url} ended the answer early",
                               "it was stopped, or cancelled the answer: ask again")
        details = usage.get("prompt_tokens_details") or {}
        inputs.usage[row] = {"prompt_tokens": usage.get("prompt_tokens"), "image_tokens": details.get("image_tokens")}
        return Generation(text="".join(pieces), completion_tokens=usage["completion_tokens"], finish_reason=finish,
                          first_token_s=time.perf_counter() - start if first is None else first,
                          total_s=time.perf_counter() - start, prompt_usage=inputs.usage[row],
                          logprobs=[lp for _, lp in tokens], ends=list(accumulate(len(token) for token, _ in tokens)))

    # ---- requests --------------------------------------------------------------------------------
    def _body(self, messages: list[dict], max_new_tokens: int | None, schema=None) -> bytes:
        body = {"model": self.model_id, "messages": messages, "logprobs": True, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": max_new_tokens or self.options.max_new_tokens}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "idefics_cli",
                                                                              "schema": schema.schema, "strict": True}}
        return json.dumps(body).encode()  # ASCII: text the server cannot take (a lone surrogate) is its 400, not ours

    def _models(self) -> dict:
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            try:
                listing = self.http.json("GET", "/v1/models")
            except ServerLoading:
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


MALFORMED = (AttributeError, IndexError, KeyError, TypeError)  # what reading a malformed chunk raises


def _chunk(event) -> tuple[str, str | None, list[tuple[str, float]], dict | None]:
    """A streamed chunk's (one) choice as (content, finish_reason, [(token, logprob)]) and its checked `usage`
    (`completion_tokens` defaulting to 0); a malformed chunk raises one of MALFORMED."""
    choice = (event.get("choices") or [{}])[0]
    content, finish = (choice.get("delta") or {}).get("content"), choice.get("finish_reason")
    entries = [(e["token"], e["logprob"]) for e in (choice.get("logprobs") or {}).get("content") or []]
    if not all(value is None or isinstance(value, str) for value in (content, finish)) or not all(
            isinstance(token, str) for token, _ in entries):
        raise TypeError
    out = (content or "", finish, [(token, _number(logprob)) for token, logprob in entries])
    usage = event.get("usage")
    if not usage:
        return (*out, None)
    details = usage.get("prompt_tokens_details") or {}
    counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"), details.get("image_tokens"))
    if not all(count is None or (type(count) is int and count >= 0) for count in counts):
        raise TypeError
    return (*out, {**usage, "completion_tokens": usage.get("completion_tokens") or 0})


def _count(value) -> int | None:
    """A card's count: a positive int, else None (unknown)."""
    return value if type(value) is int and value > 0 else None


def _number(value) -> float:
    try:
        number = float(value)
    except ValueError:  # a string that is not a number: TypeError, as any malformed chunk
        raise TypeError from None
    if not math.isfinite(number):  # NaN or Infinity (Python's json reads them): no JSON record could hold it
        raise TypeError
    return number


def _local_only(logits_processor) -> None:
    if logits_processor:
        raise UsageError("a logits processor cannot run through a server", "run without --server")


def page_data_url(image, budget: int = TIFF_BUDGET) -> tuple[str, int]:
    """A page as a lossless data: URL and the bytes spent of `budget`: a PackBits TIFF if it fits, else PNG (0).
    Either is plain RGB (no colour profile, transparency or TIFF tags): the server decodes these pixels."""
    if image.mode != "RGB" or hasattr(image, "tag_v2"):  # a TIFF frame's own tags: Pillow would write them again
        image = image.convert("RGB")
    smallest = image.height * -(-3 * image.width // 128) * 2  # PackBits: 2 bytes per 128-byte run at best
    if 0 < smallest <= budget:
        from PIL import TiffImagePlugin  # noqa: F401 - registers TIFF saving, so Pillow skips loading every plugin

        buf = io.BytesIO()
        image.save(buf, format="TIFF", compression="packbits", icc_profile=None)
        if buf.tell() <= budget:
            return "data:image/tiff;base64," + base64.b64encode(buf.getbuffer()).decode("ascii"), buf.tell()
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1, icc_profile=None, transparency=None)
    return "data:image/png;base64," + base64.b64encode(buf.getbuffer()).decode("ascii"), 0


def _image_part(image, budget: list[int]) -> dict:
    """An image_url part; `budget[0]`, the request's TIFF bytes left, goes down by what this page spent."""
    url, spent = page_data_url(image, budget[0])
    budget[0] -= spent
    return {"type": "image_url", "image_url": {"url": url}}
