"""Conversation: a multi-turn chat about page images, in the transformers chat format.

Contract: a `Conversation` holds the messages ([user turn with page images + q1, assistant a1, user q2, ...]) and
the pages shown, in image order. `attach(pages)` queues pages for the next user turn; `inputs(question)` is the
engine's `chat_inputs` for the whole conversation plus the question (the context checked there); `commit`
appends a turn (an interrupted answer is kept with `"interrupted": true`). `to_dict()` is the `/save` file
(`idefics-cli.chat/1`: the messages and the document pages of each image-bearing message).
`ChatSession.open(path, pages)` decodes the chosen pages before any model loads; `start(engine, schema=None)`
checks that they fit; `ask(question)` returns the streaming `Response` (plus `turn`), committed when it ends;
`show`, `reset` and `save` are `/pages`, `/reset` and `/save`. With a schema the model gets
`structured.with_schema(question, schema)` and decoding is constrained. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

from ..prompts import assistant_turn, user_turn
from .response import Response

CHAT_SCHEMA = "idefics-cli.chat/1"


@dataclass
class PageImage:
    path: str
    page: int
    image: object  # PIL.Image.Image
    warnings: list[str] = field(default_factory=list)  # codes of errors.WARNINGS for this page


@dataclass
class Conversation:
    engine: object
    messages: list[dict] = field(default_factory=list)
    shown: list[PageImage] = field(default_factory=list)  # the pages of the committed turns
    sources: list[dict] = field(default_factory=list)
    pending: list[PageImage] = field(default_factory=list)

    @property
    def turn(self) -> int:
        """How many questions were answered in this conversation."""
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def attach(self, pages: list[PageImage]) -> None:
        """Show these pages with the next question (replacing pages queued and not yet asked about)."""
        self.pending = list(pages)

    def reset(self, pages: list[PageImage]) -> None:
        self.messages, self.shown, self.sources = [], [], []
        self.attach(pages)

    def next_messages(self, question: str) -> list[dict]:
        return [*self.messages, user_turn(len(self.pending), question)]

    def inputs(self, question: str, max_new_tokens: int):
        """Processor outputs for the whole conversation plus `question`, refused if over the context."""
        images = [p.image for p in self.shown + self.pending]
        return self.engine.chat_inputs(self.next_messages(question), images, max_new_tokens)

    def commit(self, question: str, answer: str, interrupted: bool = False) -> None:
        """Append a turn; an answer stopped by Ctrl-C is kept as far as it went, marked `"interrupted": true`."""
        index = len(self.messages)
        reply = assistant_turn(answer)
        if interrupted:
            reply["interrupted"] = True
        self.messages.extend([user_turn(len(self.pending), question), reply])
        for p in self.pending:
            if self.sources and self.sources[-1]["message"] == index and self.sources[-1]["path"] == p.path:
                self.sources[-1]["pages"].append(p.page)
            else:
                self.sources.append({"message": index, "path": p.path, "pages": [p.page]})
        self.shown.extend(self.pending)
        self.pending = []

    def seen(self) -> list[dict]:
        """Every document page the model sees in the next turn: [{"path", "pages"}], merged per document."""
        merged: list[dict] = []
        for path, page in [(s["path"], p) for s in self.sources for p in s["pages"]] + [
                (p.path, p.page) for p in self.pending]:
            if merged and merged[-1]["path"] == path:
                if page not in merged[-1]["pages"]:
                    merged[-1]["pages"].append(page)
            else:
                merged.append({"path": path, "pages": [page]})
        return merged

    def warnings(self) -> list[str]:
        """The warning codes of every page the model sees in the next turn, each once."""
        return list(dict.fromkeys(code for p in self.shown + self.pending for code in p.warnings))

    def to_dict(self) -> dict:
        return {"schema": CHAT_SCHEMA, "model": self.engine.info, "split": self.engine.options.split,
                "messages": self.messages, "sources": self.sources}


class ChatSession:
    """A chat about one document: its chosen pages, then a `Conversation` with a loaded engine."""

    def __init__(self, doc, spec: str | None = None, status=None):
        self.doc = doc
        self.conv: Conversation | None = None
        self.schema = None  # structured.Schema for every turn, set by start()
        self.pages = self.render(spec, status)

    @classmethod
    def open(cls, path: str, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
             status=None, longest_side: int | None = None) -> ChatSession:
        """Open the document and decode the chosen pages (before any model loads: input errors come at once)."""
        from ..documents import open_document

        doc = open_document(path, password=password, dpi=dpi, longest_side=longest_side)
        try:
            return cls(doc, pages, status)
        except BaseException:
            doc.close()
            raise

    def render(self, spec: str | None, status=None) -> list[PageImage]:
        """The chosen pages of the document, decoded; `status(message)` is shown meanwhile when given."""
        from ..documents.pages import parse_page_spec

        chosen = parse_page_spec(spec).resolve(self.doc.page_count)
        with status(f"Rendering {len(chosen)} page(s)…") if status else contextlib.nullcontext():
            return [PageImage(self.doc.path, p, self.doc.render(p), self.doc.warnings(p)) for p in chosen]

    def start(self, engine, schema=None) -> ChatSession:
        """Begin the conversation on `engine`: the pages must fit its context with room for an answer.

        `schema`: every answer constrained to it (a structured.Schema, a dict or a `--schema` string)."""
        from ..structured import as_schema

        self.schema = as_schema(schema)
        engine.check_context(len(self.pages), "", engine.options.max_new_tokens)
        self.conv = Conversation(engine)
        self.conv.attach(self.pages)
        return self

    @property
    def engine(self):
        return self.conv.engine

    def show(self, spec: str | None, status=None) -> list[PageImage]:
        """`/pages SPEC`: these pages come with the next question (earlier turns keep theirs)."""
        self.pages = self.render(spec, status)
        self.conv.attach(self.pages)
        return self.pages

    def reset(self) -> None:
        """`/reset`: forget the conversation; the current pages come with the next question."""
        self.conv.reset(self.pages)

    def save(self, path: str) -> int:
        """`/save FILE`: write the conversation as JSON (atomically); returns how many messages were written."""
        from .writers import atomic_write

        atomic_write(os.path.expanduser(path), json.dumps(self.conv.to_dict(), ensure_ascii=False, indent=2) + "\n")
        return len(self.conv.messages)

    def ask(self, question: str, max_new_tokens: int | None = None, logits_processor=None,
            schema=None) -> Response:
        """The next turn: the whole conversation plus `question`; committed when the answer has been read.

        `schema` for this turn only (default: the session's, from `start`)."""
        from ..structured import as_schema
        from .records import Source

        engine, conv = self.engine, self.conv
        start = time.perf_counter()
        schema = as_schema(schema) or self.schema
        prompt = question
        if schema is not None:
            from ..structured import with_schema

            prompt = with_schema(question, schema)
        limit = max_new_tokens or engine.options.max_new_tokens
        inputs = conv.inputs(prompt, limit)
        preprocess_s = time.perf_counter() - start

        def commit(response: Response) -> None:
            conv.commit(prompt, response.received, interrupted=response.interrupted)

        return Response(engine.stream_generate(inputs, limit, logits_processor, schema), question=question,
                        sources=[Source(s["path"], s["pages"]) for s in conv.seen()], split=engine.options.split,
                        model=engine.info, usage=engine.usage(inputs), load_s=engine.load_s,
                        preprocess_s=preprocess_s, started=start, max_new_tokens=limit, warnings=conv.warnings(),
                        extra={"turn": conv.turn + 1}, on_end=commit, schema=schema)

    def close(self) -> None:
        self.doc.close()
