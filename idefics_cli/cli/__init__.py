"""The `idefics` command line: wiring only.

Contract: this package builds the Typer app and registers one small module per command. No module here
imports torch or transformers at import time, so `idefics --help` stays instant; each command imports the
library stages it needs when it runs, and hands its body to `output.run()` for errors and exit codes.
"""

from __future__ import annotations

import gc
import sys

import typer

from . import ask, chat, crops, doctor, mcp, pull, quantize, serve, transcribe
from .options import Command

app = typer.Typer(
    name="idefics",
    help="Ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit, on one GPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain help, drawn without Rich: a faster `--help` (bench/RESULTS.md)
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("ask", cls=Command, epilog=ask.EPILOG)(ask.ask_command)
app.command("transcribe", cls=Command, epilog=transcribe.EPILOG)(transcribe.transcribe_command)
app.command("chat", cls=Command, epilog=chat.EPILOG)(chat.chat_command)
app.command("crops", cls=Command, epilog=crops.EPILOG)(crops.crops_command)
app.command("doctor", cls=Command, epilog=doctor.EPILOG)(doctor.doctor_command)
app.command("pull", cls=Command, epilog=pull.EPILOG)(pull.pull_command)
app.command("quantize", cls=Command, epilog=quantize.EPILOG)(quantize.quantize_command)
app.command("serve", cls=Command, epilog=serve.EPILOG)(serve.serve_command)
app.command("mcp", cls=Command, epilog=mcp.EPILOG)(mcp.mcp_command)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"idefics-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit, on one GPU."""


def one_malloc_arena() -> bool:
    """Ask glibc for one malloc arena shared by all threads (mallopt M_ARENA_MAX=1); `transcribe` calls it first.

    `transcribe` preprocesses in a background thread and frees those buffers in the main thread; with an arena
    per thread the freed memory piled up in both and peak memory grew with the page count (bench/RESULTS.md,
    "Notes moved from the code"). True when set; elsewhere than glibc, nothing happens.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-8, 1) == 1  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def entry() -> None:
    try:
        app()
    finally:
        # The command is over and its files are closed. What is alive now (the imported modules: pymupdf's alone
        # are tens of thousands of objects) is left out of the collections that Python's shutdown runs, so the
        # process exits sooner. Atexit handlers and stdout's flush run as before.
        gc.freeze()
