"""A transcription request: what to transcribe, where to, and how (the `idefics transcribe` options).

Contract: `TranscribeRequest` is frozen; bad values raise `UsageError` when it is made. `settings_hash`, the
resume key in every record's `settings`, is computed here only: from everything that changes a page's text (model
id and revision, quantization, split, render size, prompt, max new tokens, the schema's hash). `model_prompt` is
what the model gets with each page; `check_grammar()` builds the schema's grammar (no torch) before a model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from ..errors import UsageError
from ..interface import DOCLING_PROMPT, TRANSCRIBE_PROMPT, ModelOptions
from .records import settings_hash
from .response import prompt_for

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class TranscribeRequest:
    """What to transcribe, where to, and how (the `idefics transcribe` options)."""

    inputs: tuple[str, ...]
    out: str | None = None
    options: ModelOptions = field(default_factory=ModelOptions)
    prompt: str | None = None  # None: the default transcription prompt
    pages: str | None = None  # a --pages spec (pages.py), None: every page
    dpi: int | None = None  # None: pages rendered to fit the model (longest_side)
    longest_side: int | None = None  # the model's render size (families.render_side); None: the documents' default
    doctags: bool = False  # a document model (families.doctags): its own prompt, and Markdown added to records
    password: str | None = None
    batch_size: int | str | None = None  # pages a generate call; None or "auto": from the device
    force: bool = False
    shard: str | None = None  # "I/N"
    engine: str = "local"
    ray_address: str | None = None
    schema: object = None  # structured.Schema once made (given as a Schema, a dict or a --schema string)
    min_confidence: float | None = None  # pages under it warn low_confidence (records.ok_record); not hashed
    settings_hash: str = field(init=False)

    def __post_init__(self):
        from ..documents.pages import parse_page_spec
        from .batch import parse_shard

        set_ = partial(object.__setattr__, self)
        one = isinstance(self.inputs, (str, os.PathLike))
        set_("inputs", tuple(os.fspath(p) for p in ((self.inputs,) if one else self.inputs)))
        set_("prompt", self.prompt or (DOCLING_PROMPT if self.doctags else TRANSCRIBE_PROMPT))
        set_("engine", getattr(self.engine, "value", self.engine))
        if self.engine not in ENGINES:
            raise UsageError(f"unknown --engine {self.engine!r}", "use local or ray")
        size = self.batch_size
        if size == "auto":
            size = None
        elif isinstance(size, str) and size.isdigit():
            size = int(size)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UsageError(f"bad --batch-size {self.batch_size!r}", "use a positive number or auto")
        set_("batch_size", size)
        parse_page_spec(self.pages)
        parse_shard(self.shard)
        low = self.min_confidence
        if low is not None and (isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 <= low <= 1):
            raise UsageError(f"bad --min-confidence {low!r}", "a probability from 0 to 1, e.g. 0.5")
        if self.schema is not None:
            from ..structured import as_schema

            set_("schema", as_schema(self.schema, grammar_check=False))  # the grammar: check_grammar()
        set_("settings_hash", self._settings_hash())

    def _settings_hash(self) -> str:
        from ..documents import DEFAULT_LONGEST_SIDE

        opts = self.options
        extra = {"schema": self.schema.sha256} if self.schema is not None else {}  # no schema: hashes as before
        return settings_hash(model=opts.model, revision=opts.revision, quant=opts.quant, split=opts.split,
                             render=self.dpi or self.longest_side or DEFAULT_LONGEST_SIDE,
                             render_unit="dpi" if self.dpi else "longest_side",
                             prompt=self.prompt, max_new_tokens=opts.max_new_tokens, **extra)

    @property
    def model_prompt(self) -> str:
        """What the model is asked with each page: the prompt, plus the schema's text with a schema."""
        return prompt_for(self.prompt, self.schema)

    def check_grammar(self) -> None:
        """The schema converts to a grammar (llguidance, no torch): a UsageError now, before any model loads."""
        if self.schema is not None:
            from ..structured import grammar

            grammar(self.schema.schema)

    def select_pages(self, doc) -> list[int]:
        """The chosen pages of an open document (1-based)."""
        from ..documents.pages import parse_page_spec

        return parse_page_spec(self.pages).resolve(doc.page_count)

    def open_document(self, path: str):
        from ..documents import open_document

        return open_document(path, password=self.password, dpi=self.dpi, longest_side=self.longest_side)
