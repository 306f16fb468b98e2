"""Conversation: a multi-turn chat about page images, in the transformers chat format.

Contract: `ChatSession.open(path, pages)` decodes the chosen pages before any model loads; `start(engine,
schema=None)` checks that they fit; `ask(question)` returns the streaming `Response`, committed when it ends (one
still streaming at the next `ask`, `show` or `reset` is stopped first, as `close()` does: turns keep their order);
`show`, `reset` and `save` are `/pages`, `/reset` and `/save` (`to_dict()`: the `idefics-cli.chat/1` file). It
holds the messages and the pages shown, in image order. Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time

from ..errors import UsageError
from ..interface import assistant_turn, user_turn
from ..structured import as_schema
from .records import Source
from .selection import ChosenPage, Response, Selection, answer_limit, check_question, prompt_for
from .writers import atomic_write, same_file

CHAT_SCHEMA = "idefics-cli.chat/1"


class ChatSession:
    """A chat about one document: its chosen pages, then the conversation with a loaded engine."""

    def __init__(self, doc, spec: str | None = None, status=None):
        self.doc, self.engine = doc, None
        self.schema = None  # structured.Schema for every turn, set by start()
        self.messages: list[dict] = []
        self.shown: list[ChosenPage] = []  # the pages of the committed turns
        self.sources: list[dict] = []
        self.answer: Response | None = None  # the last turn's answer
        self.show(spec, status)  # self.pages, and self.pending: shown with the next question

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

    def render(self, spec: str | None, status=None) -> list[ChosenPage]:
        """The chosen pages of the document, decoded and kept; `status(message)` is shown meanwhile when given."""
        from ..documents.pages import parse_page_spec

        chosen = parse_page_spec(spec).resolve(self.doc.page_count)
        with status(f"Rendering {len(chosen)} page(s)…") if status else contextlib.nullcontext():
            return [ChosenPage(self.doc, p, self.doc.render(p)) for p in chosen]

    def start(self, engine, schema=None) -> ChatSession:
        """Begin the conversation on `engine` (the pages must fit its context with room for an answer); `schema`
        constrains every answer (a structured.Schema, a dict or a `--schema` string)."""
        self.schema = as_schema(schema)
        engine.check_context(len(self.pages), "", engine.options.max_new_tokens)
        self.engine = engine
        return self

    @property
    def turn(self) -> int:
        """How many questions were answered in this conversation."""
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def show(self, spec: str | None, status=None) -> list[ChosenPage]:
        """`/pages SPEC`: these pages come with the next question (earlier turns keep theirs)."""
        pages = self.render(spec, status)
        self.settle()
        self.pages, self.pending = pages, list(pages)
        return self.pages

    def reset(self) -> None:
        """`/reset`: forget the conversation; the current pages come with the next question."""
        self.settle()
        self.messages, self.shown, self.sources, self.pending = [], [], [], list(self.pages)

    def settle(self) -> None:
        """Stop the last answer if it is still streaming: committed as far as it went, interrupted."""
        if self.answer is not None:
            self.answer.close()

    def commit(self, question: str, answer: str, interrupted: bool = False) -> None:
        """Append a turn; an answer stopped by Ctrl-C is kept as far as it went, marked `"interrupted": true`."""
        index = len(self.messages)
        reply = assistant_turn(answer)
        if interrupted:
            reply["interrupted"] = True
        self.messages.extend([user_turn(len(self.pending), question), reply])
        self.sources += [{"message": index, "path": path, "pages": [p.page for p in group]}
                         for path, group in itertools.groupby(self.pending, key=lambda p: p.path)]
        self.shown.extend(self.pending)
        self.pending = []

    def seen(self) -> list[dict]:
        """Every document page the model sees in the next turn: [{"path", "pages"}], merged per document."""
        seen = [(s["path"], p) for s in self.sources for p in s["pages"]] + [(p.path, p.page) for p in self.pending]
        return [{"path": path, "pages": list(dict.fromkeys(page for _, page in group))}
                for path, group in itertools.groupby(seen, key=lambda pair: pair[0])]

    def to_dict(self) -> dict:
        """The `/save` file (`idefics-cli.chat/1`)."""
        return {"schema": CHAT_SCHEMA, "model": self.engine.info, "split": self.engine.options.split,
                "messages": self.messages, "sources": self.sources}

    def save(self, path: str) -> int:
        """`/save FILE`: write the conversation as JSON (atomically); returns how many messages were written. The
        document itself is never overwritten (a `UsageError`)."""
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save to a file path, not {type(path).__name__}", "e.g. save('chat.json')")
        path = os.path.expanduser(path)
        if same_file(path, self.doc.path):
            raise UsageError(f"/save {path} would overwrite the document itself", "e.g. /save chat.json")
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name): let JSON escape them
            text = json.dumps(self.to_dict(), indent=2)
        atomic_write(path, text + "\n")
        return len(self.messages)

    def ask(self, question: str, max_new_tokens: int | None = None, logits_processor=None,
            schema=None) -> Response:
        """The next turn: the whole conversation plus `question`, committed when the answer has been read;
        `schema` for this turn only (default: the session's, from `start`). The last answer, if not read to its end,
        is stopped first (committed as far as it went, interrupted), so turns stay in order."""
        engine, start = self.engine, time.perf_counter()
        schema = as_schema(schema) or self.schema
        prompt = prompt_for(check_question(question), schema)
        limit = answer_limit(engine, max_new_tokens)
        self.settle()
        pages = self.shown + self.pending
        inputs = engine.chat_inputs([*self.messages, user_turn(len(self.pending), prompt)],
                                    [p.image for p in pages], limit)  # refused over the context
        self.answer = Response(engine, inputs, question, limit, logits_processor, schema,
                               sources=[Source(s["path"], s["pages"]) for s in self.seen()],
                               preprocess_s=time.perf_counter() - start, started=start,
                               warnings=Selection(pages).warnings(), extra={"turn": self.turn + 1},
                               on_end=lambda reply: self.commit(prompt, reply.received, interrupted=reply.interrupted))
        return self.answer

    def close(self) -> None:
        self.doc.close()
