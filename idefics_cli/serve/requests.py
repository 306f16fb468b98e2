"""Chat requests: an OpenAI `/v1/chat/completions` body in, the conversation the model sees out (docs/serve.md).

Contract: `parse(body, max_images=, longest_side=)` returns a `ChatRequest` or raises `RequestError` (an
`IdeficsError` with its OpenAI `param`). Its `pages` are opened, not rendered (a prompt is refused for length
before any pixel exists); `render()` decodes them as the CLI does. Images come only as `data:` URLs or file data.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass, field

from ..errors import IdeficsError
from ..interface import MAX_NEW_TOKENS

_SPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate ("\ud800" in JSON): not UTF-8, not text to tokenize
_DATA_URL = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)


class RequestError(IdeficsError):
    def __init__(self, code: str, message: str, param: str | None = None, hint: str | None = None):
        super().__init__(code, message, hint)
        self.param = param


def need(ok, message: str, param: str | None = None, hint: str | None = None) -> None:
    """A `usage` RequestError unless `ok`."""
    if not ok:
        raise RequestError("usage", message, param, hint)


@dataclass
class ChatRequest:
    messages: list[dict]  # transformers chat format, images as {"type": "image"}
    pages: list = field(default_factory=list)  # [(Document, page)] in prompt order
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    schema: object = None  # structured.Schema from response_format, or None
    logprobs: bool = False
    top_logprobs: int = 0
    longest_side: int | None = None  # PDF pages' render size: the model family's (None: the documents' default)

    def render(self, memo=None) -> tuple[list, list[str]]:
        """The chosen pages decoded (PIL images) and their `cache.image_digest`s; a page that cannot be decoded
        raises its code. With a memo (`ServerState.pages`), a page it holds is its `Seen` instead: the caller
        decodes it if need be. Without one, the digests are []."""
        from .cache import Seen, image_digest

        images, digests = [], []
        for doc, page in self.pages:
            source = (doc.sha256, page, self.longest_side)
            seen = memo.get(source) if memo is not None else None
            image = seen or doc.render(page)
            if memo is not None:  # without a memo (no prefix cache) nothing reads a digest
                seen = seen or Seen(image.mode, image.width, image.height, image_digest(image))
                memo.put(source, seen)
                digests.append(seen.digest)
            images.append(image)
        if not any(isinstance(image, Seen) for image in images):
            self.close()  # nothing left to decode
        return images, digests

    def close(self) -> None:
        """Close the documents (once; the chosen pages are forgotten with them)."""
        pages, self.pages = self.pages, []
        for doc in {id(d): d for d, _ in pages}.values():
            doc.close()


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    kinds = (int,) if integer else (int, float)
    need(value is None or (not isinstance(value, bool) and isinstance(value, kinds) and low <= value <= high),
         f"{name} must be {'an integer' if integer else 'a number'} from {low} to {high}", name)
    return value


def parse(body, *, max_images: int | None = None, longest_side: int | None = None) -> ChatRequest:
    need(isinstance(body, dict), "the request body must be a JSON object")
    need(body.get("n") in (None, 1), "only n=1 is supported", "n")
    for unsupported in ("tools", "functions", "tool_choice", "function_call"):
        need(not body.get(unsupported), f"{unsupported} are not supported by this server", unsupported)
    max_tokens = _number(body, "max_completion_tokens", 1, MAX_NEW_TOKENS, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, MAX_NEW_TOKENS, integer=True)
    temperature = _number(body, "temperature", 0, 2) or 0.0
    top_p = _number(body, "top_p", 0, 1)
    need(top_p != 0, "top_p must be above 0", "top_p")
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    need(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
         "stop must be a non-empty string or a list of up to 4", "stop")
    stream = body.get("stream", False)
    need(isinstance(stream, bool) or stream is None, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    need(isinstance(options, dict), "stream_options must be an object", "stream_options")
    need(isinstance(options.get("include_usage", False), bool) or options["include_usage"] is None,
         "stream_options.include_usage must be true or false", "stream_options.include_usage")
    logprobs = body.get("logprobs") or False
    need(isinstance(logprobs, bool), "logprobs must be true or false", "logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True) or 0
    need(logprobs or not top, "top_logprobs needs logprobs: true", "top_logprobs")
    schema = response_format(body.get("response_format"))
    req = ChatRequest(messages=[], max_tokens=max_tokens, temperature=float(temperature),
                      top_p=float(1.0 if top_p is None else top_p), seed=seed, stop=stop, stream=bool(stream),
                      include_usage=bool(options.get("include_usage")), schema=schema, logprobs=logprobs,
                      top_logprobs=top, longest_side=longest_side)
    try:
        _messages(body.get("messages"), req, max_images)
    except BaseException:
        req.close()
        raise
    return req


def response_format(value):
    """`response_format` -> a structured.Schema, or None for text."""
    from .. import structured

    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return structured.permissive_object()
    need(kind == "json_schema", "response_format.type must be text, json_object or json_schema", "response_format.type")
    inner = value.get("json_schema")
    need(isinstance(inner, dict), "response_format.json_schema must be an object with a schema",
         "response_format.json_schema")
    for key, kind, what in (("name", str, "a string"), ("strict", bool, "true or false"),
                            ("schema", dict, "a JSON Schema object")):
        need(isinstance(inner.get(key), kind) or (key != "schema" and inner.get(key) is None),
             f"response_format.json_schema.{key} must be {what}", f"response_format.json_schema.{key}")
    try:
        return structured.as_schema(inner["schema"])
    except IdeficsError as err:
        raise RequestError(err.code, err.message.replace("--schema", "response_format.json_schema.schema"),
                           "response_format.json_schema.schema", err.hint) from None


def _messages(messages, req: ChatRequest, max_images: int | None) -> None:
    need(isinstance(messages, list) and messages, "messages must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        need(isinstance(message, dict), f"{where} must be an object", where)
        role = message.get("role")
        need(role in ("system", "developer", "user", "assistant"),
             f"{where}.role must be system, developer, user or assistant", f"{where}.role")
        role = "system" if role == "developer" else role
        content = "" if message.get("content") is None and role == "assistant" else message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        need(isinstance(parts, list), f"{where}.content must be a string or a list of parts", f"{where}.content")
        texts, n_images = [], 0
        for j, part in enumerate(parts):
            here = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text"):
                need(isinstance(part.get("text"), str) and not _SURROGATE.search(part["text"]),
                     f"{here}.text must be a string of valid Unicode", f"{here}.text")
                texts.append(part["text"])
            elif kind in ("image_url", "file"):
                need(role == "user", f"{here}: only user messages can carry images or files", here)
                n_images += _attach(part, kind, here, req)
                if max_images is not None and len(req.pages) > max_images:
                    raise RequestError("usage", f"more than {max_images} page images in one request",
                                       here, "choose fewer pages with file.pages")
            else:
                need(False, f"{here}.type must be text, image_url or file", f"{here}.type")
        req.messages.append({"role": role, "content": [{"type": "image"} for _ in range(n_images)]
                             + [{"type": "text", "text": "\n".join(texts)}]})
    need(req.messages[-1]["role"] == "user", "the last message must be the user's",
         f"messages[{len(messages) - 1}].role")


def _attach(part: dict, kind: str, here: str, req: ChatRequest) -> int:
    """Open the document of an image_url or file part and queue its chosen pages; returns how many."""
    from ..documents import open_document
    from ..documents.pages import parse_page_spec

    spec_text, password = None, None
    if kind == "image_url":
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
        need(isinstance(url, str), f"{here}.image_url.url must be a string", f"{here}.image_url")
        need(url[:5].lower() == "data:", f"{here}: only data: URLs are accepted (the server never fetches a URL)",
             f"{here}.image_url", "send the image inline as data:image/png;base64,...")
        data = _data_url(url, here)
    else:
        inner = part.get("file")
        need(isinstance(inner, dict), f"{here}.file must be an object", f"{here}.file")
        need(inner.get("file_id") is None, f"{here}: file_id is not supported (there is no file store)",
             f"{here}.file.file_id", "send the file inline as file_data")
        raw = inner.get("file_data")
        need(isinstance(raw, str) and raw, f"{here}.file.file_data must be a data: URL or base64 text",
             f"{here}.file.file_data")
        data = _data_url(raw, here) if raw[:5].lower() == "data:" else _base64(raw, here)
        spec_text, password = inner.get("pages"), inner.get("password")
        need(spec_text is None or isinstance(spec_text, (str, int)),
             f"{here}.file.pages must be a page spec such as \"1-3,7\"", f"{here}.file.pages")
        need(password is None or isinstance(password, str) and not _SURROGATE.search(password),
             f"{here}.file.password must be a string of valid Unicode", f"{here}.file.password")
    try:
        spec = parse_page_spec(None if spec_text is None else str(spec_text))
    except IdeficsError as err:
        raise RequestError(err.code, err.message, f"{here}.file.pages", err.hint) from None
    try:
        doc = open_document(here, data=data, password=password, longest_side=req.longest_side)
    except IdeficsError as err:
        hint = "pass file.password" if err.code == "encrypted" else None if err.code == "wrong_password" else err.hint
        raise RequestError(err.code, err.message, here, hint) from None
    try:
        chosen = spec.resolve(doc.page_count)
    except IdeficsError as err:
        doc.close()
        raise RequestError(err.code, err.message, here) from None
    req.pages.extend((doc, p) for p in chosen)
    return len(chosen)


def _data_url(url: str, here: str) -> bytes:
    m = _DATA_URL.fullmatch(url)
    if m is None or _SURROGATE.search(url):
        raise RequestError("corrupt", "not a valid data: URL", here)
    return _base64(m["data"], here) if ";base64" in m["params"].lower() else urllib.parse.unquote_to_bytes(m["data"])


def _base64(text: str, here: str) -> bytes:
    """Base64 text (line breaks and other whitespace allowed) as bytes; decoded in one pass when it has none."""
    try:
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text (Unicode whitespace is stripped below, as any)
            if not _SPACE.search(text):
                raise
        return base64.b64decode(_SPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("corrupt", "the file data is not valid base64", here) from None
