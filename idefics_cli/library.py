"""The library's model: the tasks (ask, transcribe, chat) over one engine, what `load` and `connect` return.

Contract: `Model(engine)` wraps any interface.Engine (a loaded one, or a server's). `ask(documents, question,
...)` returns the streaming `Response` of `idefics ask`; `transcribe(inputs, out=None, **request_fields)` the
`Transcription` of `idefics transcribe` (same records, files and resume); `chat(path, pages=None, ...)` a
started `ChatSession`. `engine`, `options` and `info` say what runs the answers.
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
        """Ask `question` about the chosen pages of `documents`; returns the streaming `Response`.

        `documents`: paths (a str or a list, "-" for stdin) or a `Selection` from `idefics_cli.open_pages` (then
        `pages`, `password` and `dpi` were given there). `schema`: a JSON Schema (dict) or a `--schema` string;
        the answer is constrained to it and `Response.data` is the parsed value. Input errors, a prompt over the
        context and an empty question raise `IdeficsError` here; generation starts when the answer is read.
        """
        from .structured import as_schema
        from .tasks.selection import Selection, ask, open_selection

        schema = as_schema(schema)
        if isinstance(documents, Selection):
            if (pages, password, dpi) != (None, None, None):
                raise UsageError("pages, password and dpi are options of open_pages when documents is a Selection")
            return ask(self.engine, documents, question, max_new_tokens, logits_processor, schema=schema)
        selection = open_selection(documents, pages, password=password, dpi=dpi,
                               longest_side=getattr(self.engine, "render_side", None))
        try:
            return ask(self.engine, selection, question, max_new_tokens, logits_processor, close=True,
                       schema=schema)
        except BaseException:
            selection.close()
            raise

    def transcribe(self, inputs, out: str | None = None, **request_fields):
        """Transcribe files, folders or globs as `idefics transcribe` does; iterate for each `PageRecord`.

        `request_fields` are `TranscribeRequest`'s (prompt, pages, dpi, password, batch_size, force, shard,
        schema, min_confidence); the model options are this engine's. `summary` and `exit_status` afterwards.
        """
        from .tasks.transcription import TranscribeRequest, Transcription

        request_fields.setdefault("longest_side", getattr(self.engine, "render_side", None))
        request_fields.setdefault("doctags", getattr(self.engine, "doctags", False))
        return Transcription(TranscribeRequest(inputs, out, self.engine.options, **request_fields), engine=self.engine)

    def chat(self, path: str, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
             schema=None):
        """A conversation about one document: `ChatSession.ask(question)` for each turn."""
        from .tasks.conversation import ChatSession

        return ChatSession.open(path, pages, password=password, dpi=dpi,
                                longest_side=getattr(self.engine, "render_side", None)).start(self.engine, schema)
