"""Selection: the pages a question is about, opened and decoded before the model loads; the streaming answer.

Contract: `open_selection(documents, pages)` opens every document ("-" is stdin, read once) and decodes every chosen
page now (images kept up to KEEP_BYTES). `ask(engine, selection, question)` refuses an empty question and a prompt
over the context and returns a `Response`: iterating it yields each piece once (generation starts when first read);
`.text`, `.usage`, `.data`, `to_dict()` read the whole answer; `close()` stops it; Ctrl-C marks it `interrupted`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from ..errors import IdeficsError, UsageError, classify
from ..interface import MAX_NEW_TOKENS, check_option
from .confidence import fields, summary
from .records import Source

ANSWER_SCHEMA = "idefics-cli.answer/1"

KEEP_BYTES = 64 * 2**20  # decoded page images kept from the check before loading (about 7 pages at 1960 px)


@dataclass
class ChosenPage:
    doc: object  # documents.Document
    page: int
    image: object = None  # the decoded PIL image, or None: rendered again when needed

    @property
    def path(self) -> str:
        return self.doc.path

    @property
    def warnings(self) -> list[str]:
        """The codes of errors.WARNINGS for this page (complete once it is rendered)."""
        return self.doc.warnings(self.page)


@dataclass
class Selection:
    pages: list[ChosenPage]
    started: float = field(default_factory=time.perf_counter)  # when the documents were opened
    render_s: float = 0.0  # time spent decoding these pages

    def __len__(self) -> int:
        return len(self.pages)

    def decode(self) -> Selection:
        """Decode every page now (an unreadable page fails here); keep the images up to KEEP_BYTES."""
        t0, kept = time.perf_counter(), 0
        for chosen in self.pages:
            chosen.image = chosen.doc.render(chosen.page)
            kept += chosen.image.width * chosen.image.height * len(chosen.image.getbands())
            chosen.image = chosen.image if kept <= KEEP_BYTES else None
        self.render_s += time.perf_counter() - t0
        return self

    def images(self) -> list:
        """The page images in order: the kept ones, a function rendering the page for the others."""
        return [p.image if p.image is not None else functools.partial(p.doc.render, p.page) for p in self.pages]

    def each_page(self) -> list[Selection]:
        return [Selection([p], started=self.started) for p in self.pages]

    def sources(self) -> list:
        return [Source(path, [p.page for p in group])
                for path, group in itertools.groupby(self.pages, key=lambda p: p.path)]

    def page_warnings(self) -> list[tuple[str, int, str]]:
        """(path, page, code) for each warning of each page, in page order."""
        return [(p.path, p.page, code) for p in self.pages for code in p.warnings]

    def warnings(self) -> list[str]:
        return list(dict.fromkeys(code for _, _, code in self.page_warnings()))

    def close(self) -> None:
        for doc in {id(p.doc): p.doc for p in self.pages}.values():
            doc.close()


def open_selection(documents, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
               status=None, longest_side: int | None = None) -> Selection:
    """Open `documents` (a path, str, bytes or PathLike, or a list of paths), choose `pages` in each and decode them
    all (`longest_side`: the model's render size, families.render_side)."""
    from ..documents import document_paths, open_document
    from ..documents.pages import parse_page_spec

    started = time.perf_counter()
    paths = document_paths(documents)  # a path (also os.fsencode's), else a list of them
    if not paths:
        raise UsageError("give at least one document")
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    spec = parse_page_spec(pages)
    chosen: list[ChosenPage] = []
    for path in paths:
        doc = open_document(path, password=password, dpi=dpi, longest_side=longest_side)
        try:
            chosen.extend(ChosenPage(doc, p) for p in spec.resolve(doc.page_count))
        except IdeficsError as err:
            raise classify(err, path) from None
    selection = Selection(chosen, started=started)
    with status(f"Rendering {len(chosen)} page(s)…") if status else contextlib.nullcontext():
        return selection.decode()


def check_question(question: str) -> str:
    if not isinstance(question, str):
        raise UsageError(f"the question must be a string, not {type(question).__name__}")
    if not question.strip():
        raise UsageError("the question is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (argv, a piped line)
        raise UsageError("the question is not valid UTF-8 text", "check the input's encoding") from None
    return question


def answer_limit(engine, max_new_tokens: int | None) -> int:
    """`max_new_tokens` (checked), or the engine's default when None."""
    check_option("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    return max_new_tokens or engine.options.max_new_tokens


def ask(engine, selection: Selection, question: str, max_new_tokens: int | None = None, logits_processor=None,
        close: bool = False, schema=None) -> Response:
    """One question over every page of `selection`, as one user turn (images first); `close`: close the
    selection's documents when the answer ends (`Model.ask` opened them itself)."""
    check_question(question)
    prompt = prompt_for(question, schema)
    limit = answer_limit(engine, max_new_tokens)
    engine.check_context(len(selection), prompt, limit)
    t0 = time.perf_counter()
    inputs = engine.prepare([(selection.images(), prompt)])
    preprocess_s = selection.render_s + time.perf_counter() - t0
    return Response(engine, inputs, question, limit, logits_processor, schema, sources=selection.sources(),
                    preprocess_s=preprocess_s, started=selection.started, warnings=selection.warnings(),
                    on_end=(lambda _: selection.close()) if close else None)


def prompt_for(question: str, schema) -> str:
    """What the model is asked: `question`, plus the schema's text with a schema (structured.with_schema)."""
    if schema is None:
        return question
    from ..structured import with_schema  # only with a schema: no schema machinery otherwise

    return with_schema(question, schema)


class Response:
    """One answer: iterate it for the streamed pieces; `.text`, `.usage` and `to_dict()` once it is read."""

    def __init__(self, engine, inputs, question: str, max_new_tokens: int, logits_processor, schema, *,
                 sources: list[Source], preprocess_s: float, started: float, warnings: list[str] | None = None,
                 extra: dict | None = None, on_end: Callable[[Response], None] | None = None):
        """`engine`'s answer to `inputs` (`question` is what the user asked, without the schema's text)."""
        self._stream: Iterator[str] | None = engine.stream_generate(inputs, max_new_tokens, logits_processor, schema)
        self._pieces: list[str] = []
        self._generation = None  # engine.Generation once the stream has ended
        self._error: BaseException | None = None
        self._ended_at: float | None = None
        self._on_end = on_end
        self.question, self.sources, self.split, self.model = question, sources, engine.options.split, engine.info
        self.max_new_tokens, self.schema, self.interrupted = max_new_tokens, schema, False
        self.warnings, self.extra = list(warnings or []), dict(extra or {})
        self._prompt_usage = dict(engine.usage(inputs))
        self._load_s, self._preprocess_s, self._started = engine.load_s, preprocess_s, started

    def __iter__(self) -> Iterator[str]:
        while self._stream is not None:
            try:
                piece = next(self._stream)
            except StopIteration as done:
                self._end(done.value)
                return
            except KeyboardInterrupt:
                self.interrupted = True
                self._end(None)
                raise
            except BaseException as exc:
                self._stream, self._error = None, exc
                raise
            self._pieces.append(piece)
            yield piece

    def _end(self, generation) -> None:
        self._stream, self._generation, self._ended_at = None, generation, time.perf_counter()
        if self._on_end is not None:
            self._on_end(self)

    def _ended(self):
        """Read the rest of the answer; its Generation, None when interrupted (a stream that failed fails again)."""
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        return self._generation

    def close(self) -> None:
        """Stop generating (the pieces read so far stay); a closed answer that had not ended is interrupted."""
        if self._stream is not None:
            self._stream.close()
            self.interrupted = True
            self._end(None)

    @property
    def received(self) -> str:
        """The text read so far, without reading more."""
        return "".join(self._pieces)

    @property
    def done(self) -> bool:
        """Whether the stream has ended (finished, interrupted or failed)."""
        return self._stream is None

    @property
    def text(self) -> str:
        self._ended()
        return self.received

    @property
    def finish_reason(self) -> str | None:
        """"stop" (end of utterance) or "length" (cut at max_new_tokens); None when interrupted."""
        return getattr(self._ended(), "finish_reason", None)

    @property
    def usage(self) -> dict:
        """{"prompt_tokens", "image_tokens", "completion_tokens"} (completion None when interrupted)."""
        gen = self._ended()
        # a server's model (client.py) learns the prompt's token counts with the answer: its generation carries them
        prompt = getattr(gen, "prompt_usage", None) or self._prompt_usage
        return {**prompt, "completion_tokens": getattr(gen, "completion_tokens", None)}

    @property
    def timing(self) -> dict:
        """Seconds: load_s (the model), preprocess_s (pages to inputs), first_token_s (from the start of
        generation), total_s (from the moment the pages were opened to the end of the answer)."""
        first = getattr(self._ended(), "first_token_s", None)
        return {"load_s": round(self._load_s, 4), "preprocess_s": round(self._preprocess_s, 4),
                "first_token_s": round(first or 0.0, 4), "total_s": round(self._ended_at - self._started, 4)}

    @property
    def confidence(self) -> dict | None:
        """{"mean_logprob", "min_prob", "min_at"} (tasks/confidence.py); None when interrupted."""
        gen = self._ended()
        return summary(gen.logprobs, gen.ends) if gen else None

    @property
    def field_confidence(self):
        """With a schema and `.data`: `data`'s shape with each leaf's lowest token probability; else None."""
        if self.data is None or self._generation is None:
            return None
        return fields(self.text, self._generation.logprobs, self._generation.ends)

    @functools.cached_property
    def _read_back(self) -> tuple:  # (data, error code) read against the schema
        from ..structured import read_answer

        return read_answer(self.text, self.schema, self.finish_reason)

    @property
    def data(self):
        """With a schema: the parsed, validated answer (None when the answer has none); without one: None."""
        return self._read_back[0] if self.schema is not None else None

    @property
    def schema_error(self):
        """With a schema: None when `.data` is the answer or the answer was interrupted, else the IdeficsError saying
        why there is none."""
        code = self._read_back[1] if self.schema is not None and not self.interrupted else None
        if code is None:
            return None
        from ..structured import answer_error

        return answer_error(code, self.max_new_tokens)

    def to_dict(self) -> dict:
        """The answer object of `ask --json` (schema idefics-cli.answer/1), `extra` fields after the schema."""
        out = {"schema": ANSWER_SCHEMA, **self.extra, "question": self.question, "answer": self.text}
        error = self.schema_error
        if self.schema is not None:
            out.update(data=self.data, field_confidence=self.field_confidence, schema_sha256=self.schema.sha256)
        out.update(finish_reason=self.finish_reason, sources=[asdict(s) for s in self.sources], split=self.split,
                   model=self.model, usage=self.usage, timing=self.timing, warnings=self.warnings,
                   confidence=self.confidence, **({"error": error.to_dict()} if error is not None else {}))
        return copy.deepcopy(out)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        state = "interrupted" if self.interrupted else "done" if self.done else "streaming"
        return f"<Response {state} {self.question!r}: {''.join(self._pieces)[:40]!r}>"
