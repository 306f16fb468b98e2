"""The `idefics` command line: the Typer app; a module per command (tools.py: the small ones).

Contract: no module here imports torch or transformers at import time, so `idefics --help` stays instant; each
command imports what it needs when it runs (options.py: `runs` turns errors into one line and an exit status).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading

import typer

from . import ask, chat, tools, transcribe
from .options import Command, Group

app = typer.Typer(
    name="idefics",
    cls=Group,  # click's usage errors as one line `error [usage]: ...`
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help, drawn without Rich: a faster `--help`
    context_settings={"help_option_names": ["-h", "--help"]},
)
for module in (ask, transcribe, chat, tools):
    for name, examples in module.EXAMPLES.items():
        app.command(name, cls=Command, epilog="Examples:\n\n\b" + examples)(getattr(module, f"{name}_command"))


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"idefics-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit, on one GPU."""


def entry() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before a command's own handling (parsing its arguments)
        _stay_interrupted()
        sys.stderr.write("interrupted\n")
        _exit_now(130)
    except SystemExit as done:
        if done.code == 130:
            _stay_interrupted()
        if done.code not in (0, None) and any(t.daemon and t.is_alive() for t in threading.enumerate()):
            _exit_now(done.code)
        raise
    finally:
        gc.freeze()  # what is alive now is left out of the shutdown's collections: a faster exit


def _stay_interrupted() -> None:
    """Interrupted: a second Ctrl-C or SIGTERM while the command exits (its exit handlers) is ignored, not a
    traceback from the handler it lands in."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _exit_now(code) -> None:
    """Exit without finalizing the interpreter: a daemon thread still inside torch (a model loading when Ctrl-C or
    an error ends the command) would be unwound from C++ as the interpreter goes, and the process abort (SIGABRT).
    The exit handlers run and the standard streams are flushed first."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 1)
