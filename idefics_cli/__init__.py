"""idefics-cli: ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit.

The library face: `load(model, **options)` and `connect(url)` return a `Model` with `ask` (a streaming `Response`),
`transcribe` and `chat` over any interface.Engine, as the commands; `open_pages` decodes pages ahead of loading.
Warnings, logging, environment and allocators are left alone unless `tune_process()`; torch loads with the model.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .errors import UsageError
from .interface import (
    DEFAULT_MODEL,
    MAX_NEW_TOKENS,
    TRANSCRIBE_TOKENS,
    Engine,
    ModelOptions,
    check_device,
    check_option,
)
from .process import tune_process

_tune_process = tune_process  # `load`'s keyword of the same name hides it

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "Model", "connect", "load", "open_pages", "tune_process"]

TRANSCRIBE_FIELDS = ("prompt", "pages", "dpi", "password", "batch_size", "force", "shard", "schema", "min_confidence")
_DEFAULTS = ModelOptions()  # one set of defaults: the CLI's options and this function's keywords


class Model:
    """The tasks (ask, transcribe, chat) over one engine: what `load` and `connect` return; `transcribe` answers up
    to `transcribe_tokens` new tokens a page (default: the engine's max_new_tokens)."""

    def __init__(self, engine: Engine, transcribe_tokens: int | None = None):
        self.engine = engine
        self.transcribe_tokens = transcribe_tokens or engine.options.max_new_tokens

    @property
    def options(self):
        return self.engine.options

    @property
    def info(self) -> dict:
        return self.engine.info

    def __repr__(self) -> str:
        return f"<idefics_cli.Model {self.engine.options.model}>"

    def ask(self, documents, question: str, *, pages: str | None = None, password: str | None = None,
            dpi: int | None = None, max_new_tokens: int | None = None, logits_processor=None, schema=None):
        """The streaming `Response` to `question` about `documents` (paths, "-", or an `open_pages` Selection);
        `schema` (dict or `--schema` string) constrains it (`Response.data`). Bad input raises IdeficsError here;
        generation starts when the answer is read."""
        from .structured import as_schema
        from .tasks.selection import Selection, ask, open_selection

        schema = as_schema(schema)
        ours = not isinstance(documents, Selection)  # opened here: closed with the response
        if not ours and (pages, password, dpi) != (None, None, None):
            raise UsageError("pages, password and dpi are options of open_pages when documents is a Selection")
        selection = open_selection(documents, pages, password=password, dpi=dpi,
                                   longest_side=self.engine.render_side) if ours else documents
        try:
            return ask(self.engine, selection, question, max_new_tokens, logits_processor, close=ours, schema=schema)
        except BaseException:
            if ours:
                selection.close()
            raise

    def transcribe(self, inputs, out: str | None = None, **request_fields):
        """Transcribe files, folders or globs as `idefics transcribe` does; iterate for each `PageRecord`.
        `request_fields` are those of docs/python.md (else UsageError); `summary` and `exit_status` afterwards."""
        from .tasks.transcription import TranscribeRequest, Transcription

        unknown = sorted(set(request_fields) - set(TRANSCRIBE_FIELDS))
        if unknown:
            raise UsageError(f"transcribe() takes no {', '.join(unknown)}",
                             f"its options: {', '.join(TRANSCRIBE_FIELDS)}")

        request_fields.setdefault("longest_side", self.engine.render_side)
        request_fields.setdefault("doctags", self.engine.doctags)
        options = replace(self.engine.options, max_new_tokens=self.transcribe_tokens)
        return Transcription(TranscribeRequest(inputs, out, options, **request_fields), engine=self.engine)

    def chat(self, path: str, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
             schema=None):
        """A conversation about one document: `ChatSession.ask(question)` for each turn."""
        from .tasks.conversation import ChatSession

        return ChatSession.open(path, pages, password=password, dpi=dpi,
                                longest_side=self.engine.render_side).start(self.engine, schema)


def load(model: str = DEFAULT_MODEL, *, revision: str | None = _DEFAULTS.revision, quant: str = _DEFAULTS.quant,
         dtype: str = _DEFAULTS.dtype, device: str = _DEFAULTS.device, offline: bool = _DEFAULTS.offline,
         split: bool = _DEFAULTS.split, max_new_tokens: int | None = None, tune_process: bool = False) -> Model:
    """Load a model (hub id or local folder) as the CLI's model options do; its `Model`. quant: auto, 4bit, 8bit
    (CUDA) or none; dtype: auto, bfloat16, float16 or float32; device: auto, cpu, cuda or cuda:N; max_new_tokens:
    every answer's limit (default: the commands', 512 for ask and chat, 1024 a page for transcribe); tune_process:
    opt in to the commands' process settings. Raises `IdeficsError("model_error" | "out_of_memory")` with a hint."""
    from .runtime.model import load_engine as load_model

    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise UsageError(f"model must be a hub id or a folder (str or os.PathLike), not {model!r}")
    model = os.fspath(model)
    for name, value in (("offline", offline), ("split", split), ("tune_process", tune_process)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, not {value!r}")
    if not (revision is None or isinstance(revision, str)):
        raise UsageError(f"revision must be a string (a branch, tag or commit), not {revision!r}")
    if quant not in ("auto", "4bit", "8bit", "none"):
        raise UsageError(f"quant {quant!r}: use auto, 4bit, 8bit or none")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    check_device(device)
    if max_new_tokens is not None:
        check_option("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    if tune_process:
        _tune_process()
    options = ModelOptions(model=model, revision=revision, quant=quant, dtype=dtype, device=device, offline=offline,
                           split=split, max_new_tokens=max_new_tokens or _DEFAULTS.max_new_tokens)
    return Model(load_model(options), max_new_tokens or TRANSCRIBE_TOKENS)


def open_pages(documents, pages: str | None = None, *, password: str | None = None, dpi: int | None = None):
    """Open documents and decode their chosen pages now (no model needed); give the result to `Model.ask`."""
    from .tasks.selection import open_selection

    return open_selection(documents, pages, password=password, dpi=dpi)


def connect(url: str, *, api_key: str | None = None, max_new_tokens: int | None = None):
    """The `Model` of a running `idefics serve` at `url` (pages rendered here; max_new_tokens as `load`'s);
    `IdeficsError("model_error")` naming the URL when the server cannot be reached or refuses the key."""
    from .remote.client import RemoteEngine

    if max_new_tokens is not None:
        check_option("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    for name, value in (("url", url), ("api_key", "" if api_key is None else api_key)):
        if not isinstance(value, str):
            raise UsageError(f"{name} must be a string, not {type(value).__name__}")
    return Model(RemoteEngine(url, api_key, max_new_tokens), max_new_tokens or TRANSCRIBE_TOKENS)
