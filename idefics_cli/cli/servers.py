"""`idefics serve` (OpenAI-compatible HTTP, serve/, docs/serve.md) and `idefics mcp` (MCP on stdio, mcp/, docs/mcp.md).

serve refuses unsafe settings before binding (usage error, exit 2), serves until SIGTERM/Ctrl-C and exits 0 after
draining; a model that cannot load exits 5. mcp reads documents only under its `--root` folders, stdout carries the
protocol only; it exits 0 when the host closes stdin, and SIGTERM and Ctrl-C end it at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from . import options as o

EXAMPLES = {
    "serve": """
  idefics serve                                   # http://127.0.0.1:8000, the default model, 4-bit
  idefics serve --port 8080 --max-batch 8 --cache-mb 4096
  IDEFICS_API_KEY=secret idefics serve --host 0.0.0.0
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d @req.json
""",
    "mcp": """
  idefics mcp --root ~/Documents                     # an MCP host starts this; the tools read under ~/Documents
  idefics mcp --root ~/scans --root ~/invoices --quant 8bit
  idefics mcp --root ~/Documents --server http://127.0.0.1:8000   # answer with a running idefics serve
""",
}


@o.model_params(512)
@o.runs
def serve_command(
    out,
    host: Annotated[str, typer.Option(
        help="Address to listen on; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="IDEFICS_API_KEY", metavar="KEY", show_envvar=True,
                                                help="Require `Authorization: Bearer KEY` (every route but "
                                                     "/health).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=256, metavar="N", help="Requests decoded together.")] = 4,
    max_queue: Annotated[int, typer.Option(min=0, max=100000, metavar="N",
                                           help="Requests that may wait; more get 503 with Retry-After.")] = 16,
    cache_mb: Annotated[float | None, typer.Option(min=0, metavar="MB",
                                                   help="Prefix cache size (default: 1/4 of free GPU memory, "
                                                        "or 1/10 of available RAM up to 4 GiB; 0: off).")] = None,
    max_request_mb: Annotated[float, typer.Option(min=0.001, metavar="MB",
                                                  help="Largest request body (413 above).")] = 64.0,
    grace: Annotated[float, typer.Option(min=0, metavar="SECONDS",
                                         help="On SIGTERM/Ctrl-C, how long in-flight requests may finish.")] = 30.0,
    cors: Annotated[str | None, typer.Option(metavar="ORIGIN", help="Allow browser requests from this origin.")] = None,
    opts: o.ModelOptions = None,
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API. Chat completions with images and PDFs, batched."""
    from ..serve.config import ServeConfig, check

    config = ServeConfig(host=host, port=port, api_key=api_key or None, max_queue=max_queue, max_batch=max_batch,
                         cache_mb=cache_mb, max_request_mb=max_request_mb, grace=grace, cors=cors)
    check(config)
    try:
        from ..serve.server import run_server
    except ImportError as exc:
        raise UsageError(f"`idefics serve` needs the serve extra ({exc.name} is missing)",
                         "pip install 'idefics-cli[serve]'") from None
    from ..runtime.model import load_engine

    return run_server(config, lambda: load_engine(opts))


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
