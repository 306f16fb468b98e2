"""`idefics chat DOC`: a multi-turn conversation about a document; the page images stay in the conversation.

Contract: every turn sends the whole conversation ([user turn with the page images + q1, assistant a1,
user q2, ...]) through the processor's chat template, so later questions see the pages and earlier
answers. On a terminal: a prompt with line editing and history (readline), answers streamed to stdout,
`/pages SPEC` shows other pages with the next question, `/reset` starts over, `/save FILE.json` writes the
conversation (messages in the transformers chat format + sources), `/help`; Ctrl-C stops an answer,
Ctrl-D leaves; an answer stopped by Ctrl-C stays in the conversation as far as it went, marked
`"interrupted": true` (so in `/save` too). When stdin is not a terminal: one question (or /command) per input
line, and one JSON answer per output line (schema `idefics-cli.answer/1` plus `"turn"`); a bad line is one
error line on stderr and the conversation goes on (the exit status is then that of the first failed line).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer

from . import options as o

EPILOG = """Examples:

\b
  idefics chat report.pdf --pages 1-2
  printf 'What is the title?\\nWho wrote it?\\n' | idefics chat report.pdf -p 1 | jq -r .answer
  printf 'Total?\\n/pages 2\\nAnd on this page?\\n/save chat.json\\n' | idefics chat invoice.pdf -p 1

\b
In the chat:  /pages SPEC · /reset · /save FILE.json · /help · Ctrl-D to leave
"""
HELP = ("/pages SPEC   show these pages with the next question (earlier turns keep theirs)\n"
        "/reset        forget the conversation (the current pages come with the next question)\n"
        "/save FILE    write the conversation as JSON\n"
        "//text        ask a question that starts with /\n"
        "Ctrl-C stops an answer (kept, marked interrupted), Ctrl-D (or /quit) leaves.")


def chat(
    doc: Annotated[str, typer.Argument(metavar="DOC", show_default=False, help="A PDF or image (- for stdin).")],
    pages: o.Pages = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    model: o.Model = o.DEFAULT_MODEL,
    revision: o.Revision = None,
    quant: o.QuantOpt = o.Quant.bit4,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.Device = "auto",
    offline: o.Offline = False,
    split: o.Split = True,
    max_new_tokens: o.max_new_tokens_option(512) = 512,
) -> None:
    """Chat about a document: the page images stay in the conversation; JSON lines when piped."""
    from ..output import Output, run

    out = Output()
    opts = o.model_options(model, revision, quant, dtype, device, offline, split, max_new_tokens)
    raise typer.Exit(run(lambda: Session(out, doc, pages, dpi, password, opts).run(), out))


class Session:
    def __init__(self, out, path, pages, dpi, password, opts):
        from ..documents import open_document

        if path == "-" and sys.stdin is not None and not sys.stdin.isatty():
            raise_usage("chat reads questions from stdin, so the document cannot come from stdin too")
        self.out, self.opts = out, opts
        self.interactive = sys.stdin is not None and sys.stdin.isatty()
        self.doc = open_document(path, password=password, dpi=dpi)
        self.pages = self._render(pages)

    def _render(self, spec: str | None):
        from ..conversation import PageImage
        from ..errors import warning_line
        from ..pages import parse_page_spec

        chosen = parse_page_spec(spec).resolve(self.doc.page_count)
        with self.out.status(f"Rendering {len(chosen)} page(s)…"):
            pages = [PageImage(self.doc.path, p, self.doc.render(p)) for p in chosen]
        for p in chosen if self.interactive else ():  # piped, they are in each JSON answer's "warnings"
            for code in self.doc.warnings(p):
                self.out.warn(warning_line(code, self.doc.path, p))
        return pages

    def run(self) -> int:
        from ..conversation import Conversation
        from ..model import load

        with self.out.status(f"Loading {self.opts.model} ({self.opts.quant})…"):
            self.engine = load(self.opts)
        self.engine.check_context(len(self.pages), "", self.opts.max_new_tokens)
        self.conv = Conversation(self.engine)
        self.conv.attach(self.pages)
        try:
            if self.interactive:
                return self._interactive()
            return self._scripted()
        finally:
            self.doc.close()

    def _scripted(self) -> int:
        """One question or /command a line; a bad line is one error line and the conversation goes on. The exit
        status is that of the first failed line (0 when none failed)."""
        from ..errors import IdeficsError

        status = 0
        for line in sys.stdin:
            text = line.strip()
            if not text:
                continue
            try:
                self._handle(text)
            except IdeficsError as err:
                if err.code == "model_error":
                    raise
                self.out.error(err)
                status = status or int(err.exit_status)
        return status

    # ---- terminal -------------------------------------------------------------------------------
    def _interactive(self) -> int:
        import signal

        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        previous = signal.signal(signal.SIGTERM, _terminate)  # Ctrl-C at the prompt goes on; SIGTERM never does
        try:
            return self._loop()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _loop(self) -> int:
        from ..errors import IdeficsError

        pages = ",".join(str(p.page) for p in self.pages)
        self.out.console.print(f"Chatting about {self.doc.path} (page {pages}) with {self.opts.model}. "
                               "/help for commands, Ctrl-D to leave.", style="dim", markup=False)
        while True:
            try:
                if not self.out.stdout_tty:
                    sys.stderr.write(">>> ")
                    sys.stderr.flush()
                text = input(">>> " if self.out.stdout_tty else "").strip()
            except EOFError:
                sys.stderr.write("\n")
                return 0
            except Terminated:
                raise
            except KeyboardInterrupt:
                sys.stderr.write("\n")
                continue
            if not text:
                continue
            if text in ("/quit", "/exit", "/bye"):
                return 0
            try:
                self._handle(text)
            except Terminated:
                raise
            except AnswerInterrupted:
                self.out.write("\n")
                self.out.console.print("(answer interrupted: kept as far as it went, marked interrupted)",
                                       style="yellow")
            except KeyboardInterrupt:
                self.out.write("\n")
                self.out.console.print("(stopped)", style="yellow")
            except IdeficsError as err:  # the turn is forgotten; the conversation goes on
                if err.code == "model_error":
                    raise
                if err.code == "out_of_memory" and not err.hint:
                    err.hint = "/reset to start a shorter conversation"
                self.out.error(err)

    # ---- one line -------------------------------------------------------------------------------
    def _handle(self, text: str) -> None:
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            command = {"/pages": self._pages, "/reset": self._reset, "/save": self._save, "/help": self._help}.get(name)
            if command is None:
                raise_usage(f"unknown command {name}", "/pages SPEC, /reset, /save FILE.json, /help")
            command(arg.strip())
            return
        self._ask(text[1:] if text.startswith("//") else text)

    def _pages(self, spec: str) -> None:
        if not spec:
            raise_usage("/pages needs a page spec", "e.g. /pages 2 or /pages 1-3")
        self.pages = self._render(spec)
        self.conv.attach(self.pages)
        self._note(f"the next question shows page(s) {','.join(str(p.page) for p in self.pages)}")

    def _reset(self, _arg: str) -> None:
        self.conv.reset(self.pages)
        self._note("conversation reset")

    def _help(self, _arg: str) -> None:
        self.out.console.print(HELP, markup=False, highlight=False)

    def _save(self, path: str) -> None:
        from ..errors import IdeficsError

        if not path:
            raise_usage("/save needs a file name", "e.g. /save chat.json")
        path = os.path.expanduser(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.conv.to_dict(), f, ensure_ascii=False, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise IdeficsError("output_error", f"cannot write {path}: {exc.strerror or exc}") from exc
        self._note(f"saved {len(self.conv.messages)} messages to {path}")

    def _note(self, message: str) -> None:
        if self.interactive or self.out.stderr_tty:
            self.out.console.print(message, style="dim", markup=False)

    def _ask(self, question: str) -> None:
        from ..engine import Generation
        from ..records import Answer, Source

        start = time.perf_counter()
        inputs = self.conv.inputs(question, self.opts.max_new_tokens)
        preprocess_s = time.perf_counter() - start
        gen = Generation()
        pieces = self.engine.stream_generate(inputs, generation=gen)
        if self.interactive:
            answered = []
            try:
                with self.out.status("Thinking…") as status:
                    for piece in pieces:
                        if status is not None:
                            status.stop()
                            status = None
                        answered.append(piece)
                        self.out.write(piece)
            except Terminated:
                raise
            except KeyboardInterrupt:
                self.conv.commit(question, "".join(answered), interrupted=True)
                raise AnswerInterrupted from None
            self.out.write("\n")
            if gen.finish_reason == "length":
                self.out.warn(f"the answer was cut at --max-new-tokens {self.opts.max_new_tokens}; raise it for the "
                              "whole answer")
        else:
            for _ in pieces:
                pass
        self.conv.commit(question, gen.text)
        if self.interactive:
            return
        answer = Answer(question=question, answer=gen.text, finish_reason=gen.finish_reason,
                        sources=[Source(s["path"], s["pages"]) for s in self.conv.seen()],
                        split=self.opts.split, model=self.engine.info,
                        usage={**self.engine.usage(inputs), "completion_tokens": gen.completion_tokens},
                        timing={"load_s": round(self.engine.load_s, 4), "preprocess_s": round(preprocess_s, 4),
                                "first_token_s": round(gen.first_token_s or 0.0, 4),
                                "total_s": round(time.perf_counter() - start, 4)},
                        warnings=list(dict.fromkeys(code for seen in self.conv.seen() for page in seen["pages"]
                                                    for code in self.doc.warnings(page))))
        record = answer.to_dict()
        self.out.json_line({"schema": record.pop("schema"), "turn": self.conv.turn, **record})


class Terminated(KeyboardInterrupt):
    """SIGTERM: leaves the chat (exit 130), where Ctrl-C only stops the current answer."""


class AnswerInterrupted(KeyboardInterrupt):
    """Ctrl-C during an answer: what was answered is kept in the conversation, marked interrupted."""


def _terminate(signum, frame):
    raise Terminated


def raise_usage(message: str, hint: str | None = None):
    from ..errors import UsageError

    raise UsageError(message, hint)
