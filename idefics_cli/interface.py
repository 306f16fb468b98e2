"""What the tasks (ask, chat, transcribe, the server) need from a model, declared once.

`Engine` is the protocol the local engine, a server's model (client.py) and the Ray actors implement; tasks use nothing
else. `ModelOptions` are its settings (the CLI's model options), `Generation` one finished answer. Inputs are the
engine's own (`prepare`, `chat_inputs`): a task only hands them back to the engine that made them. `user_turn` is one
user message in the transformers chat format (page images first, as the model card does); the commands' prompts.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import UsageError

DEFAULT_MODEL = "HuggingFaceM4/idefics2-8b"
TRANSCRIBE_PROMPT = (
    "Transcribe all the text on this page, in reading order, as Markdown. Keep tables as Markdown tables. "
    "Output only the transcription."
)
DOCLING_PROMPT = "Convert this page to docling."  # SmolDocling's and granite-docling's own (DocTags answers)
MAX_NEW_TOKENS = 32768  # the most new tokens an answer may ask for: the CLI's, the API's and the server's bound
TRANSCRIBE_TOKENS = 1024  # `transcribe`'s default --max-new-tokens (a whole page); ask and chat: ModelOptions'
DPI_RANGE = (10, 1200)  # --dpi's bounds, and the API's dpi


def check_option(name: str, value, low: int, high: int):
    """`value` if it is None or an integer from `low` to `high`; else UsageError naming the option."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise UsageError(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


DEVICES = "auto, cpu, cuda or cuda:N"  # --device's values (N: a GPU's index)


def check_device(device, name: str = "device") -> str:
    """`device` if it is one of `DEVICES`; else UsageError naming the option (before anything loads)."""
    if not (isinstance(device, str) and (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", device))):
        raise UsageError(f"{name} {device!r} is not a device", f"use {DEVICES}")
    return device


@dataclass
class ModelOptions:
    """Every setting of a model: what it is, how it is loaded, and its answers' defaults."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    quant: str = "auto"  # auto: nf4 from 4B parameters (runtime/families.py), 4bit, 8bit or none
    dtype: str = "auto"
    device: str = "auto"
    offline: bool = False
    split: bool = True
    max_new_tokens: int = 512


@dataclass
class Generation:
    """One finished answer."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop, length
    first_token_s: float | None = None
    total_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    prompt_usage: dict = field(default_factory=dict)  # {"prompt_tokens", "image_tokens"}
    logprobs: list[float] = field(default_factory=list)  # each token's (runtime/decode.py); [] when unknown
    ends: list[int] = field(default_factory=list)  # where each token's part of `text` ends (Row.token_ends)


class Engine(Protocol):
    """A model that answers prompts made of page images and text."""

    options: ModelOptions  # the settings answers depend on
    load_s: float
    render_side: int | None  # the px PDF pages are rendered to for this model (None: the documents' default)
    doctags: bool  # a document model answering in DocTags (SmolDocling, granite-docling)

    @property
    def info(self) -> dict:
        """{"id", "revision", "quantization", "dtype", "device"} (the JSON's `model`)."""

    def check_context(self, n_images: int, question: str, max_new_tokens: int) -> int | None:
        """Refuse (UsageError) a prompt that cannot fit the context; its length when known here."""

    def auto_batch_size(self) -> int:
        """Rows worth decoding together."""

    def prepare(self, batch: list[tuple[list, str]], split: bool | None = None, collect: bool = False) -> Any:
        """Inputs for [(page images, question)], one user turn each (images may be functions rendering one)."""

    def chat_inputs(self, messages: list[dict], images: list, max_new_tokens: int) -> Any:
        """Inputs for a whole conversation (transformers chat format) and its images in order."""

    def usage(self, inputs: Any, row: int = 0) -> dict:
        """{"prompt_tokens", "image_tokens"} of a row of `inputs`."""

    def stream_generate(self, inputs: Any, max_new_tokens: int | None = None, logits_processor=None,
                        schema=None) -> Generator[str, None, Generation]:
        """Yield the pieces of a one-row answer; return its Generation."""

    def generate_batch(self, inputs: Any, max_new_tokens: int | None = None, logits_processor=None,
                       schema=None) -> list[Generation]:
        """Every row's answer."""

    def generate_rows(self, items: Iterable[tuple[Any, Any, int]], max_new_tokens: int | None = None, schema=None,
                      width: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Continuous batching over (tag, inputs, row) items: yields (tag, Generation or IdeficsError)."""


def user_turn(n_images: int, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}
