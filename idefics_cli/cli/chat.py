"""`idefics chat DOC`: a multi-turn conversation about a document; the page images stay in the conversation.

Contract: the REPL around the library's `ChatSession` (docs/chat.md). On a terminal, answers stream; piped, one
JSON answer per line, a bad line is one error line and the exit status is the first failed line's.
"""

from __future__ import annotations

import signal
import sys

from ..errors import IdeficsError, StalledAnswer, UsageError, warning_line
from . import options as o

EXAMPLES = {"chat": """
  idefics chat report.pdf --pages 1-2
  printf 'What is the title?\\nWho wrote it?\\n' | idefics chat report.pdf -p 1 | jq -r .answer
  printf 'Total?\\n/pages 2\\nAnd on this page?\\n/save chat.json\\n' | idefics chat invoice.pdf -p 1
  echo 'Extract the invoice fields' | idefics chat invoice.pdf --schema 'vendor, total float'

\b
In the chat:  /pages SPEC · /reset · /save FILE.json · /help · Ctrl-D to leave
"""}
HELP = ("/pages SPEC   show these pages with the next question (earlier turns keep theirs)\n"
        "/reset        forget the conversation (the current pages come with the next question)\n"
        "/save FILE    write the conversation as JSON\n"
        "//text        ask a question that starts with /\n"
        "Ctrl-C stops an answer (kept, marked interrupted), Ctrl-D (or /quit) leaves.")
QUIT = ("/quit", "/exit", "/bye")


@o.model_params(o.ANSWER_TOKENS)
@o.runs
def chat_command(
    out,
    doc: o.Doc,
    pages: o.PagesOpt = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    schema: o.SchemaOpt = None,
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> int:
    """Chat about a document; JSON lines when piped. The page images stay in the conversation."""
    from ..tasks.conversation import ChatSession

    if schema is not None:  # the schema machinery loads only for --schema
        from ..structured import parse_schema

        schema = parse_schema(schema)  # a usage error before the document is opened
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if doc == "-" and sys.stdin is not None and not interactive:
        raise UsageError("chat reads questions from stdin, so the document cannot come from stdin too")
    remote, side = o.connect_first(opts, server, api_key, out)
    chat = ChatSession.open(doc, pages, password=password, dpi=dpi, status=out.status, longest_side=side)
    session = Session(out, chat, interactive)
    previous = signal.signal(signal.SIGTERM, _terminate)  # Ctrl-C at the prompt goes on; SIGTERM never does
    try:
        chat.start(remote or o.engine(opts, out), schema=schema)
        return session.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        chat.close()


class Session:
    """The REPL around a library `ChatSession`: reads lines, runs /commands, prints answers."""

    def __init__(self, out, chat, interactive: bool):
        self.out, self.chat, self.interactive = out, chat, interactive
        self._warn(chat.pages)

    def _warn(self, pages) -> None:
        for p in pages if self.interactive else ():  # piped, they are in each JSON answer's "warnings"
            for code in p.warnings:
                self.out.warn(warning_line(code, p.path, p.page))

    def run(self) -> int:
        """One question or /command a line, until the end of input or /quit (/exit, /bye: piped too, the lines after
        it are not read) or a stdout that cannot be written; piped, the exit status is the first failed line's."""
        status = 0
        for text in self._typed() if self.interactive else _piped():
            if not text:
                continue
            if text in QUIT:
                break
            try:
                self._handle(text)
            except KeyboardInterrupt as stop:
                if isinstance(stop, Terminated) or not self.interactive:
                    raise
                self.out.write("\n")
                self.out.console.print("(stopped)", style="yellow")
            except IdeficsError as err:  # the turn is forgotten; the conversation goes on
                if err.code == "model_error" and not isinstance(err, StalledAnswer):  # the model or server is gone
                    raise
                if err.code == "output_error" and err.path is None:  # stdout is gone (full, closed): so are answers
                    raise
                if self.interactive and err.code == "out_of_memory" and not err.hint:
                    err.hint = "/reset to start a shorter conversation"
                self.out.error(err)
                status = status or (0 if self.interactive else int(err.exit_status))
        return status

    def _typed(self):
        """Lines typed at the prompt until Ctrl-D; Ctrl-C there starts a new line."""
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        pages = ",".join(str(p.page) for p in self.chat.pages)
        model = self.chat.engine.options.model  # the server's with --server
        self.out.console.print(f"Chatting about {self.chat.doc.path} (page {pages}) with {model}. "
                               "/help for commands, Ctrl-D to leave.", style="dim", markup=False)
        while True:
            try:
                if self.out.stdout_tty:
                    text = input(">>> ")
                else:  # as input() does then, but it flushes stdout, which may not take it (full): an internal error
                    sys.stderr.write(">>> ")
                    sys.stderr.flush()
                    text = sys.stdin.readline()
                    if not text:
                        raise EOFError
            except EOFError:
                sys.stderr.write("\n")
                return
            except UnicodeDecodeError:  # a strict locale: the line is refused as the piped one is, the chat goes on
                self.out.error(UsageError("the question is not valid UTF-8 text"))
                continue
            except KeyboardInterrupt as stop:
                if isinstance(stop, Terminated):
                    raise
                sys.stderr.write("\n")
                continue
            yield text.strip()

    def _handle(self, text: str) -> None:
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            command = {"/pages": self._pages, "/reset": self._reset, "/save": self._save, "/help": self._help}.get(name)
            if command is None:
                raise UsageError(f"unknown command {name}", "/pages SPEC, /reset, /save FILE.json, /help")
            command(arg.strip())
            return
        self._ask(text[1:] if text.startswith("//") else text)

    def _pages(self, spec: str) -> None:
        if not spec:
            raise UsageError("/pages needs a page spec", "e.g. /pages 2 or /pages 1-3")
        pages = self.chat.show(spec, status=self.out.status)
        self._warn(pages)
        self._note(f"the next question shows page(s) {','.join(str(p.page) for p in pages)}")

    def _reset(self, _arg: str) -> None:
        self.chat.reset()
        self._note("conversation reset")

    def _help(self, _arg: str) -> None:
        self.out.console.print(HELP, markup=False, highlight=False)

    def _save(self, path: str) -> None:
        if not path:
            raise UsageError("/save needs a file name", "e.g. /save chat.json")
        if _is_stdio(path):  # `/save /dev/stdout`: the answer lines (or the script, the errors) would be replaced
            raise UsageError(f"/save {path} would write over the chat's own input or output", "e.g. /save chat.json")
        self._note(f"saved {self.chat.save(path)} messages to {path}")

    def _note(self, message: str) -> None:
        if self.interactive or self.out.stderr_tty:
            self.out.console.print(message, style="dim", markup=False)

    def _ask(self, question: str) -> None:
        response = self.chat.ask(question)
        if not self.interactive:
            self.out.json_line(response.to_dict())
        else:
            try:
                self.out.stream(response)
            except KeyboardInterrupt as stop:  # the answer so far is in the conversation, marked interrupted
                if isinstance(stop, Terminated):
                    raise
                self.out.write("\n")
                self.out.console.print("(answer interrupted: kept as far as it went, marked interrupted)",
                                       style="yellow")
                return
        if response.schema_error is not None:  # --schema: the turn stays; the line counts as failed
            raise response.schema_error


def _piped():
    """stdin's lines, stripped (a byte order mark too: Notepad, PowerShell); bytes that do not decode stay as lone
    surrogates for check_question to refuse (strict decoding would end the chat at the first, the conversation lost)."""
    if sys.stdin is None:  # stdin closed: no lines
        return
    encoding = sys.stdin.encoding or "utf-8"
    for line in getattr(sys.stdin, "buffer", sys.stdin):
        yield (line.decode(encoding, "surrogateescape") if isinstance(line, bytes) else line).strip().lstrip("\ufeff")


def _is_stdio(path: str) -> bool:
    """True when `path` is the file (or pipe, or terminal) of this process's stdin, stdout or stderr."""
    import os

    from ..tasks.writers import same_file

    return any(same_file(os.path.expanduser(path), fd) for fd in (0, 1, 2))


class Terminated(KeyboardInterrupt):
    """SIGTERM: leaves the chat (exit 130), where Ctrl-C only stops the current answer."""


def _terminate(signum, frame):
    raise Terminated
