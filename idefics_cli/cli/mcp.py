"""`idefics mcp --root DIR...`: a Model Context Protocol server over stdio, for agent hosts (idefics_cli/mcp/).

Contract: documents are read only under the `--root` folders (docs/mcp.md); stdout carries the protocol only. It
exits 0 when the host closes stdin; SIGTERM and Ctrl-C end it at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import options as o

EXAMPLES = """
  idefics mcp --root ~/Documents                     # an MCP host starts this; the tools read under ~/Documents
  idefics mcp --root ~/scans --root ~/invoices --quant 8bit
  idefics mcp --root ~/Documents --server http://127.0.0.1:8000   # answer with a running idefics serve
"""


@o.model_params(o.ANSWER_TOKENS)
@o.runs
def mcp_command(
    out,
    root: Annotated[list[Path], typer.Option("--root", metavar="DIR", show_default=False,
                                             help="A folder the tools may read documents from (repeatable).")],
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> int:
    """Serve the documents under --root to an MCP host over stdio.

    Tools: ask_document, transcribe_document and list_pages, for Claude Desktop, an IDE or any MCP client.
    """
    import signal
    from dataclasses import asdict

    from ..errors import UsageError

    missing = [str(r) for r in root if not r.is_dir()]
    if missing:
        raise UsageError(f"--root {missing[0]} is not a folder", "give folders that exist")
    try:
        from ..mcp.server import serve_mcp
    except ImportError as exc:
        raise UsageError(f"`idefics mcp` needs the mcp extra ({exc.name} is missing)",
                         "pip install 'idefics-cli[mcp]'") from None

    def loader():  # the library's Model: loaded here, or a running server's
        from .. import connect, load

        if server:
            return connect(server, api_key=api_key, max_new_tokens=opts.max_new_tokens)
        return load(**asdict(opts))

    # SIGTERM and Ctrl-C end the process at once: a thread blocked reading stdin would otherwise hold it open
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return serve_mcp([str(r) for r in root], loader, lambda line: print(f"idefics mcp: {line}", file=sys.stderr,
                                                                        flush=True))
