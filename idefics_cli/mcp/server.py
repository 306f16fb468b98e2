"""The MCP server of `idefics mcp`: three tools over stdio, reading only files under the given roots.

Contract: `serve_mcp(roots, loader, log)` serves `build_mcp(roots, loader)`'s tools `list_pages`, `ask_document`
and `transcribe_document` until stdin closes (returns at once when it is closed). A path must resolve (symlinks
followed) to a file under a root, else a `permission_denied` tool error (a NUL in it, a folder, a FIFO or device:
`usage`); an `IdeficsError` is a tool error whose text is its line `error [CODE]: message (hint)`. `loader()`
(the library `Model`) runs once in a thread; model tools wait for it and answer one at a time. Logs go to stderr.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent

from ..ahead import in_thread
from ..errors import IdeficsError, classify

INSTRUCTIONS = ("Read local PDFs and images (scans, invoices, reports, photos of pages) with a vision-language "
                "model running on this machine. Paths must be under the folders the user shared.")


def resolve(roots: list[str], path: str) -> str:
    """The real path of `path` when it is a file under one of `roots` (symlinks resolved), else a ToolError. A
    relative path is tried in each root in turn: the first that exists and stays under the roots is used."""
    if "\x00" in path:
        raise ToolError("error [usage]: a path cannot contain a NUL character")
    if not path.strip():
        raise ToolError("error [usage]: the path is empty: give a document under the --root folders")
    candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
    reals = [os.path.realpath(c) for c in candidates]
    inside = [r for r in reals if any(os.path.commonpath([r, root]) == root for root in roots)]
    real = next((r for r in inside if os.path.exists(r)), None) or next(
        (r for r in reals if os.path.exists(r)), reals[0])
    if real not in inside:
        raise ToolError(f"error [permission_denied]: {path}: only files under the --root folders may be read "
                        f"({', '.join(roots)}), symlinks resolved")
    if os.path.isdir(real):
        raise ToolError(f"error [usage]: {path} is a folder: give a document (list its files with your own tools)")
    if os.path.exists(real) and not os.path.isfile(real):  # a FIFO would block the call for ever
        raise ToolError(f"error [usage]: {path} is not a regular file (a FIFO, socket or device): give a document")
    return real


def unread(schema):
    """A schema argument: an object, inline JSON or fields, never a file read (only documents under the roots are);
    text that names one is a usage error."""
    from ..structured import parse_schema

    return parse_schema(schema, files=False) if isinstance(schema, str) and schema.strip() else schema


def build_mcp(roots: list[str], loader, log=lambda line: None) -> MCPServer:
    roots = [os.path.realpath(r) for r in roots]
    model = in_thread(lambda: _load(loader, log), "idefics-load")  # from now on: the model's Future
    lock = threading.Lock()  # one answer at a time: the engine is not shared between threads
    server = MCPServer("idefics", instructions=INSTRUCTIONS, log_level="WARNING")

    def tool(fn):
        """`fn` as a tool whose ToolError is an error result holding its text alone (raised, it would reach the
        client after "Error executing tool NAME: ")."""
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ToolError as exc:
                return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)

        return server.tool(structured_output=True)(run)

    def answering(work):
        try:
            with lock:
                return work(model.result())
        except Exception as exc:  # noqa: BLE001 - a tool error with its code (generation_error when unknown)
            raise ToolError(classify(exc).one_line()) from None

    @tool
    def list_pages(path: str) -> dict[str, Any]:
        """How many pages a document has (PDF, image, TIFF, EPUB, ...) and its format, without the model."""
        from ..documents import open_document

        real = resolve(roots, path)
        try:
            with open_document(real) as doc:
                return {"path": real, "format": doc.kind, "pages": doc.page_count}
        except IdeficsError as err:
            raise ToolError(err.one_line()) from None

    @tool
    def ask_document(path: str, question: str, pages: str | None = None,
                     schema: str | dict | None = None) -> dict[str, Any]:
        """Ask a question about a document's pages; returns the answer object (`answer`, `sources`, `usage`).

        pages: 1-based page spec such as "1-3,7" (default every page). schema: a JSON Schema (object or JSON
        text) or fields such as "vendor, total float, paid bool": the answer is JSON valid against it, in `data`.
        """
        real = resolve(roots, path)
        return answering(lambda m: m.ask(real, question, pages=pages, schema=unread(schema)).to_dict())

    @tool
    def transcribe_document(path: str, pages: str | None = None) -> dict[str, Any]:
        """Transcribe a document's pages to Markdown; returns one record per page (`text`, `status`, `page`).

        pages: 1-based page spec such as "1-3,7" (default every page).
        """
        real = resolve(roots, path)

        def transcribe(m):
            run = m.transcribe([real], pages=pages)
            records = [record.to_dict() for record in run]
            if not records and run.errors:
                raise run.errors[0]
            return {"records": records}

        return answering(transcribe)

    return server


def _load(loader, log):
    try:
        model = loader()
    except BaseException as exc:  # noqa: BLE001 - every model tool reports it
        error = classify(exc, stage="load")
        log(error.one_line())
        raise error from None
    log("model ready")
    return model


def serve_mcp(roots: list[str], loader, log=lambda line: None) -> int:
    if sys.stdin is None:  # stdin closed (`<&-`): no host to serve, as when it closes stdin
        log("stdin is closed: nothing to serve")
        return 0
    log(f"serving {', '.join(roots)} over stdio; loading the model…")
    build_mcp(roots, loader, log).run("stdio")
    return 0
