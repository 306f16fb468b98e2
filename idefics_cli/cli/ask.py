"""`idefics ask DOC... QUESTION`: one question over the chosen pages; the answer streams to stdout.

Contract: every chosen page of every document becomes one image in a single user turn (images first,
then the question), answered greedily and streamed piece by piece to stdout; `--json` prints the answer
object of docs/formats.md instead (its `warnings` are the pages' warning codes; in text mode each is a line
on stderr); `--each-page` asks each page on its own (NDJSON with `--json`).
Documents are opened, page specs checked and every chosen page decoded before the model loads, so input
errors are instant.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated

import typer

from . import options as o

KEEP_BYTES = 64 * 2**20  # decoded page images kept from the check before loading (about 7 pages at 1960 px)

EPILOG = """Examples:

\b
  idefics ask samples/invoice.pdf "What is the total amount due?"
  idefics ask report.pdf scan.png --pages 1-3 "Which year had the highest revenue?" --json | jq -r .answer
  cat receipt.jpg | idefics ask - "What is the merchant's name?"
  idefics ask report.pdf --each-page "What is this page about?" --json
"""


def ask(
    docs_and_question: Annotated[list[str], typer.Argument(metavar="DOC... QUESTION", show_default=False,
                                                           help="Documents (PDF or images, - for stdin), then the "
                                                                "question.")],
    pages: o.Pages = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object (schema idefics-cli.answer/1).")] = False,
    each_page: Annotated[bool, typer.Option("--each-page", help="Ask every page separately.")] = False,
    model: o.Model = o.DEFAULT_MODEL,
    revision: o.Revision = None,
    quant: o.QuantOpt = o.Quant.bit4,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.Device = "auto",
    offline: o.Offline = False,
    split: o.Split = True,
    max_new_tokens: o.max_new_tokens_option(512) = 512,
) -> None:
    """Ask a question about the pages of one or more documents; the answer streams to stdout."""
    from ..output import Output, run

    out = Output()
    opts = o.model_options(model, revision, quant, dtype, device, offline, split, max_new_tokens)
    raise typer.Exit(run(lambda: _ask(out, docs_and_question, pages, dpi, password, json_, each_page, opts), out))


def _ask(out, args, pages, dpi, password, as_json, each_page, opts) -> int:
    from ..documents import open_document
    from ..errors import IdeficsError, UsageError, classify
    from ..pages import parse_page_spec

    start = time.perf_counter()
    if len(args) < 2:
        raise UsageError("give at least one document and a question", 'e.g. idefics ask doc.pdf "What is this?"')
    *paths, question = args
    if not question.strip():
        raise UsageError("the question is empty")
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    spec = parse_page_spec(pages)
    chosen = []
    for path in paths:
        doc = open_document(path, password=password, dpi=dpi)
        try:
            chosen.extend((doc, p) for p in spec.resolve(doc.page_count))
        except IdeficsError as err:
            raise classify(err, path) from None
    # every chosen page is decoded before the model loads, so a page that cannot be read fails at once. The
    # images are kept up to KEEP_BYTES (a few pages: no second rendering for the usual question); past that they
    # are dropped and rendered again when their chunk goes through the vision tower (vision.py), so a question
    # over N pages never holds N page images
    t0 = time.perf_counter()
    images, kept = [], 0
    with out.status(f"Rendering {len(chosen)} page(s)…"):
        for doc, p in chosen:
            image = doc.render(p)
            kept += image.width * image.height * len(image.getbands())
            images.append(image if kept <= KEEP_BYTES else None)
            image = None
    render_s = time.perf_counter() - t0
    pages_ = [(doc, p, image) for (doc, p), image in zip(chosen, images)]
    groups = [[page] for page in pages_] if each_page else [pages_]

    from ..model import load

    with out.status(f"Loading {opts.model} ({opts.quant})…"):
        engine = load(opts)
    for group in groups:
        engine.check_context(len(group), question, opts.max_new_tokens)
    for group in groups:
        _answer(out, engine, group, question, as_json, each_page and not as_json, start,
                0.0 if each_page else render_s)
    return 0


def cut_note(max_new_tokens: int, group=None) -> str:
    """The stderr note for an answer that --max-new-tokens cut short (`finish_reason` "length" in JSON)."""
    where = f"{group[0][0].path} page {group[0][1]}: " if group else ""
    return f"{where}the answer was cut at --max-new-tokens {max_new_tokens}; raise it for the whole answer"


def _answer(out, engine, group, question, as_json, header, start, render_s: float) -> None:
    from ..engine import Generation
    from ..errors import warning_line
    from ..records import Answer, Source

    t0 = time.perf_counter()
    with out.status(f"Preparing {len(group)} page(s)…"):
        pages = [image if image is not None else functools.partial(doc.render, page) for doc, page, image in group]
        inputs = engine.prepare([(pages, question)])
        pages = None
    preprocess_s = render_s + time.perf_counter() - t0
    warnings = list(dict.fromkeys(code for doc, page, _ in group for code in doc.warnings(page)))
    if not as_json:
        for doc, page, _ in group:
            for code in doc.warnings(page):
                out.warn(warning_line(code, doc.path, page))
    if header:
        doc, page, _ = group[0]
        out.write(f"==> {doc.path} [page {page}] <==\n")
    gen = Generation()
    pieces = engine.stream_generate(inputs, generation=gen)
    if as_json:
        for _ in pieces:
            pass
    else:
        with out.status("Thinking…") as status:
            for piece in pieces:
                if status is not None:
                    status.stop()
                    status = None
                out.write(piece)
        out.write("\n")
        if gen.finish_reason == "length":
            out.warn(cut_note(engine.options.max_new_tokens, group if header else None))
    if not as_json:
        return
    sources: list[Source] = []
    for doc, page, _ in group:
        if sources and sources[-1].path == doc.path:
            sources[-1].pages.append(page)
        else:
            sources.append(Source(doc.path, [page]))
    answer = Answer(question=question, answer=gen.text, finish_reason=gen.finish_reason, sources=sources,
                    split=engine.options.split, model=engine.info,
                    usage={**engine.usage(inputs), "completion_tokens": gen.completion_tokens},
                    timing={"load_s": round(engine.load_s, 4), "preprocess_s": round(preprocess_s, 4),
                            "first_token_s": round(gen.first_token_s or 0.0, 4),
                            "total_s": round(time.perf_counter() - start, 4)}, warnings=warnings)
    out.json_line(answer.to_dict())
