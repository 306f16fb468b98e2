"""The library's model: the tasks (ask, transcribe, chat) over one engine, what `load` and `connect` return.

`Model(engine)` wraps any interface.Engine. `ask(documents, question, ...)` returns the streaming `Response` of
`idefics ask`, `transcribe(inputs, out=None, **request_fields)` the `Transcription` of `idefics transcribe`,
`chat(path, ...)` a started `ChatSession`.
"""

from __future__ import annotations

from .errors import UsageError
from .interface import Engine


class Model:
    """The tasks over one engine (see the module contract)."""

    def __init__(self, engine: Engine):
        self.engine = engine

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
        if isinstance(documents, Selection):
            if (pages, password, dpi) != (None, None, None):
                raise UsageError("pages, password and dpi are options of open_pages when documents is a Selection")
            return ask(self.engine, documents, question, max_new_tokens, logits_processor, schema=schema)
        selection = open_selection(documents, pages, password=password, dpi=dpi,
                               longest_side=self.engine.render_side)
        try:
            return ask(self.engine, selection, question, max_new_tokens, logits_processor, close=True,
                       schema=schema)
        except BaseException:
            selection.close()
            raise

    def transcribe(self, inputs, out: str | None = None, **request_fields):
        """Transcribe files, folders or globs as `idefics transcribe` does; iterate for each `PageRecord`.
        `request_fields` are `TranscribeRequest`'s; `summary` and `exit_status` afterwards."""
        from .tasks.transcription import TranscribeRequest, Transcription

        request_fields.setdefault("longest_side", self.engine.render_side)
        request_fields.setdefault("doctags", self.engine.doctags)
        return Transcription(TranscribeRequest(inputs, out, self.engine.options, **request_fields), engine=self.engine)

    def chat(self, path: str, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
             schema=None):
        """A conversation about one document: `ChatSession.ask(question)` for each turn."""
        from .tasks.conversation import ChatSession

        return ChatSession.open(path, pages, password=password, dpi=dpi,
                                longest_side=self.engine.render_side).start(self.engine, schema)
