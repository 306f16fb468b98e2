"""`idefics ask DOC... QUESTION`: one question over the chosen pages; the answer streams to stdout.

Contract: parsing and printing over the library's `selection.ask` (docs/ask.md). Every chosen page is decoded
before the model loads, so input errors are instant; `--schema` without an answer that fits exits 5.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from . import options as o

EXAMPLES = {"ask": """
  idefics ask samples/invoice.pdf "What is the total amount due?"
  idefics ask report.pdf scan.png --pages 1-3 "Which year had the highest revenue?" --json | jq -r .answer
  cat receipt.jpg | idefics ask - "What is the merchant's name?"
  idefics ask report.pdf --each-page "What is this page about?" --json
  idefics ask invoice.pdf "Extract the invoice fields" --schema 'vendor, total float, due_date'
"""}


@o.model_params(o.ANSWER_TOKENS)
@o.runs
def ask_command(
    out,
    docs_and_question: Annotated[list[str], typer.Argument(metavar="DOC... QUESTION", show_default=False,
                                                           help="Documents (PDF or images, - for stdin), then the "
                                                                "question.")],
    pages: o.PagesOpt = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object (schema idefics-cli.answer/1).")] = False,
    each_page: Annotated[bool, typer.Option("--each-page", help="Ask every page separately.")] = False,
    schema: o.SchemaOpt = None,
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> int:
    """Ask a question about the pages of one or more documents. The answer streams to stdout."""
    from ..errors import UsageError, warning_line
    from ..tasks.selection import ask, check_question, open_selection

    if schema is not None:  # the schema machinery loads only for --schema
        from ..structured import parse_schema

        schema = parse_schema(schema)  # a bad schema is a usage error before anything is opened
    if len(docs_and_question) < 2:
        raise UsageError("give at least one document and a question", 'e.g. idefics ask doc.pdf "What is this?"')
    *paths, question = docs_and_question
    if " " not in question and os.path.isfile(question):  # `idefics ask a.pdf b.pdf`: the question left out
        raise UsageError(f"the question {question!r} is a file: no question was given",
                         'the question comes last, e.g. idefics ask a.pdf b.pdf "What is this?"')
    check_question(question)
    remote, side = o.connect_first(opts, server, api_key, out)
    selection = open_selection(paths, pages, password=password, dpi=dpi, status=out.status,  # before the model loads
                               longest_side=side)
    engine = remote or o.engine(opts, out)
    status = 0
    for group in selection.each_page() if each_page else [selection]:
        with out.status(f"Preparing {len(group)} page(s)…"):
            response = ask(engine, group, question, schema=schema)
        if json_:
            out.json_line(response.to_dict())
            if response.schema_error is not None:
                status = status or int(response.schema_error.exit_status)
            continue
        for path, page, code in group.page_warnings():
            out.warn(warning_line(code, path, page))
        where = ""
        if each_page:
            where = f"{group.pages[0].doc.path} page {group.pages[0].page}: "
            out.write(f"==> {group.pages[0].doc.path} [page {group.pages[0].page}] <==\n")
        if schema is None:
            out.stream(response, where)
        else:
            status = _print_data(out, response, where) or status
    return status


def _print_data(out, response, where: str) -> int:
    """`--schema` in text mode: the JSON object on stdout, or an error line (exit status 5) when there is none."""
    import json

    with out.status("Thinking…"):
        _ = response.text  # read the whole answer (under the spinner)
    err = response.schema_error
    if err is not None:
        err.path = where.removesuffix(": ") or None
        out.error(err)
        return int(err.exit_status)
    out.write(json.dumps(response.data, ensure_ascii=False) + "\n")
    return 0
