"""Selection: the pages a question is about, opened and decoded before the model loads; the question itself.

Contract: `open_selection(documents, pages)` opens every document ("-" is stdin, read once) and decodes every chosen
page now, so an unreadable page fails before any model loads (images kept up to KEEP_BYTES). `ask(engine, selection,
question, ...)` refuses an empty question and a prompt over the context up front and returns the streaming
`Response`; with a schema the model gets `structured.with_schema(question, schema)`.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import time
from dataclasses import dataclass, field

from ..errors import IdeficsError, UsageError, classify
from .response import Response, prompt_for

KEEP_BYTES = 64 * 2**20  # decoded page images kept from the check before loading (about 7 pages at 1960 px)


@dataclass
class ChosenPage:
    doc: object  # documents.Document
    page: int
    image: object = None  # the decoded PIL image, or None: rendered again when needed


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
            image = chosen.doc.render(chosen.page)
            kept += image.width * image.height * len(image.getbands())
            chosen.image = image if kept <= KEEP_BYTES else None
            image = None
        self.render_s += time.perf_counter() - t0
        return self

    def images(self) -> list:
        """The page images in order: the kept ones, a function rendering the page for the others."""
        return [p.image if p.image is not None else functools.partial(p.doc.render, p.page) for p in self.pages]

    def each_page(self) -> list[Selection]:
        return [Selection([p], started=self.started) for p in self.pages]

    def sources(self) -> list:
        from .records import Source

        return [Source(path, [p.page for p in group])
                for path, group in itertools.groupby(self.pages, key=lambda p: p.doc.path)]

    def page_warnings(self) -> list[tuple[str, int, str]]:
        """(path, page, code) for each warning of each page, in page order."""
        return [(p.doc.path, p.page, code) for p in self.pages for code in p.doc.warnings(p.page)]

    def warnings(self) -> list[str]:
        return list(dict.fromkeys(code for _, _, code in self.page_warnings()))

    def close(self) -> None:
        for doc in {id(p.doc): p.doc for p in self.pages}.values():
            doc.close()


def open_selection(documents, pages: str | None = None, *, password: str | None = None, dpi: int | None = None,
               status=None, longest_side: int | None = None) -> Selection:
    """Open `documents` (a path or a list of paths), choose `pages` in each and decode them all (`longest_side`:
    the model's render size, families.render_side)."""
    from ..documents import open_document
    from ..documents.pages import parse_page_spec

    started = time.perf_counter()
    paths = [documents] if isinstance(documents, (str, os.PathLike)) else list(documents)
    paths = [os.fspath(p) for p in paths]
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
    if not question.strip():
        raise UsageError("the question is empty")
    return question


def ask(engine, selection: Selection, question: str, max_new_tokens: int | None = None, logits_processor=None,
        close: bool = False, schema=None) -> Response:
    """One question over every page of `selection`, as one user turn (images first); `close`: close the
    selection's documents when the answer ends (`Model.ask` opened them itself)."""
    check_question(question)
    prompt = prompt_for(question, schema)
    limit = max_new_tokens or engine.options.max_new_tokens
    engine.check_context(len(selection), prompt, limit)
    t0 = time.perf_counter()
    inputs = engine.prepare([(selection.images(), prompt)])
    preprocess_s = selection.render_s + time.perf_counter() - t0
    return Response(engine, inputs, question, limit, logits_processor, schema, sources=selection.sources(),
                    preprocess_s=preprocess_s, started=selection.started, warnings=selection.warnings(),
                    on_end=(lambda _: selection.close()) if close else None)
