"""Output: the one object that decides what goes to stdout and what to stderr.

stdout carries data only, flushed piece by piece; status, progress, warnings and errors go to stderr (Rich, imported
only when drawn; plain lines when piped). `run(body)` turns a command body into an exit status: `IdeficsError` -> one
`error [code]: ...` line, Ctrl-C/SIGTERM -> 130, a closed stdout -> quiet, anything else -> internal (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
import warnings

from .errors import ExitStatus, IdeficsError


class Output:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.stdout_tty = sys.stdout is not None and sys.stdout.isatty()  # None: closed (`>&-`)
        self.stderr_tty = sys.stderr is not None and sys.stderr.isatty()
        self._console = None

    @property
    def console(self):
        """The Rich console on stderr, made (and Rich imported) when first used; piped, it never wraps lines."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=not self.stderr_tty)
        return self._console

    def write(self, text: str) -> None:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates (a non-UTF-8 file name)
        if sys.stdout is None:
            raise IdeficsError("output_error", "cannot write to stdout: it is closed")
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            _silence_stdout()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise IdeficsError("output_error", f"cannot write to stdout: {reason}") from None

    def json_line(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a non-UTF-8 file name): let JSON escape them
            line = json.dumps(obj)
        self.write(line + "\n")

    def stream(self, response, where: str = "") -> None:
        """Write an answer's pieces as they come (a spinner until the first), a newline, and a note (prefixed by
        `where`) if it was cut; whatever stops the writing closes the response, and after Ctrl-C the screen shows
        all the text the response keeps."""
        shown = 0
        try:
            with self.status("Thinking…") as spinner:
                for piece in response:
                    if spinner is not None:
                        spinner.stop()
                        spinner = None
                    shown += len(piece)
                    self.write(piece)
        except BaseException as exc:
            response.close()
            if isinstance(exc, KeyboardInterrupt) and response.received[shown:]:  # kept before it was shown
                self.write(response.received[shown:])
            raise
        self.write("\n")
        if response.finish_reason == "length":
            self.warn(f"{where}the answer was cut at --max-new-tokens {response.max_new_tokens}; raise it for the "
                      "whole answer")

    def status(self, message: str):
        """A spinner on a terminal's stderr; nothing otherwise."""
        if self.quiet or not self.stderr_tty:
            return contextlib.nullcontext()
        return self.console.status(message, spinner="dots")

    def info(self, message: str) -> None:
        if not self.quiet and self.stderr_tty:
            self.console.print(message, style="dim")

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}", "yellow")

    def error(self, err: IdeficsError) -> None:
        self._line(err.one_line(), "bold red" if self.stderr_tty else None, soft_wrap=True)

    def _line(self, line: str, style: str | None, **options) -> None:
        """`line` on stderr, one line (a newline in a file name a space): drawn by Rich on a terminal (or
        FORCE_COLOR), else written plain as Rich would."""
        line = line.replace("\n", " ")
        if self.stderr_tty or self._console is not None or os.environ.get("FORCE_COLOR"):
            self.console.print(line, style=style, markup=False, **options)
            return
        try:
            sys.stderr.write(line.translate(_CONTROL) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # AttributeError: None, closed before the start (`2>&-`)
            pass  # a closed stderr: nothing more can be said


_CONTROL = dict.fromkeys(map(ord, "\a\b\v\f\r"))  # what Rich strips from printed text


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run(body, out: Output | None = None) -> int:
    """Run a command body and turn whatever happens into an exit status (never a traceback); Python warnings are
    hidden unless IDEFICS_DEBUG=1, which also shows tracebacks."""
    out = out or Output()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    with warnings.catch_warnings():
        if not os.environ.get("IDEFICS_DEBUG"):
            warnings.simplefilter("ignore")
        try:
            return int(body() or ExitStatus.OK)
        except KeyboardInterrupt:
            out.console.print("interrupted", style="yellow")
            return int(ExitStatus.INTERRUPTED)
        except BrokenPipeError:
            _silence_stdout()
            return int(ExitStatus.OK)
        except Exception as exc:  # noqa: BLE001 - an IdeficsError, or the last line of defence (internal)
            if os.environ.get("IDEFICS_DEBUG"):
                traceback.print_exc()
            if not isinstance(exc, IdeficsError):
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                exc = IdeficsError("internal", msg, "this is a bug; rerun with IDEFICS_DEBUG=1 and report it")
            out.error(exc)
            return int(exc.exit_status)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
