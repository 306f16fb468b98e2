"""`idefics chat`: every turn feeds the model the processor's own formatting of the whole conversation."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import termios
import time

import pytest
import torch
from conftest import make_pdf
from transformers import AutoProcessor

from idefics_cli.documents import open_document
from idefics_cli.interface import assistant_turn, user_turn

FAST = ["--quant", "none", "--device", "cpu", "--max-new-tokens", "5", "--dpi", "40"]


@pytest.fixture
def model_calls(monkeypatch):
    """Record what reaches the model: each turn's token ids, its page images (before vision.py builds their
    pixels: tests/test_vision.py holds those to the processor's) and the crops the vision tower got."""
    from idefics_cli.runtime.engine import LocalEngine

    calls = []
    original = LocalEngine.features

    def recording(self, inputs):
        vision = inputs["vision"]
        call = {"input_ids": inputs["input_ids"].detach().clone(), "images": [im.tobytes() for _, im in vision.sources]}
        features = original(self, inputs)
        call["crops"] = sum(vision.slots)
        calls.append(call)
        return features

    monkeypatch.setattr(LocalEngine, "features", recording)
    return calls


def test_scripted_turns_pages_and_save(cli, tiny_model, tmp_path, model_calls):
    pdf = make_pdf(tmp_path / "report.pdf", n_pages=3)
    saved = tmp_path / "chat.json"
    script = f"What is the title?\n\nAnd the colour?\n/pages 2-3\nWhat changed?\n/save {saved}\n"
    result = cli("chat", pdf, "--pages", "1", "--model", tiny_model, *FAST, input=script)
    assert result.exit_code == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["turn"] for a in answers] == [1, 2, 3]
    assert {a["schema"] for a in answers} == {"idefics-cli.answer/1"}
    one, three = [{"path": pdf, "pages": [1]}], [{"path": pdf, "pages": [1, 2, 3]}]
    assert [a["sources"] for a in answers] == [one, one, three]
    assert len(model_calls) == 3

    processor = AutoProcessor.from_pretrained(tiny_model)
    with open_document(pdf, dpi=40) as doc:
        p1, p2, p3 = (doc.render(p) for p in (1, 2, 3))
    a1, a2, a3 = (a["answer"] for a in answers)
    messages = [user_turn(1, "What is the title?"), assistant_turn(a1), user_turn(0, "And the colour?")]
    turns = [(messages[:1], [p1]), (messages, [p1]),
             (messages + [assistant_turn(a2), user_turn(2, "What changed?")], [p1, p2, p3])]
    for k, (msgs, images) in enumerate(turns):
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        want = processor(text=[text], images=[images], return_tensors="pt")
        got = model_calls[k]
        assert torch.equal(got["input_ids"], want["input_ids"]), f"turn {k + 1}"
        assert got["images"] == [im.tobytes() for im in images], f"turn {k + 1}"
        assert answers[k]["usage"]["prompt_tokens"] == want["input_ids"].shape[1]
    assert want["pixel_values"].shape[1] == 15 and model_calls[1]["crops"] == 5 and model_calls[2]["crops"] == 15

    data = json.loads(saved.read_text())
    assert data["schema"] == "idefics-cli.chat/1"
    assert data["messages"] == turns[2][0] + [assistant_turn(a3)]
    assert data["sources"] == [{"message": 0, "path": pdf, "pages": [1]}, {"message": 4, "path": pdf, "pages": [2, 3]}]


def test_reset_starts_over_with_the_current_pages(cli, tiny_model, tmp_path, model_calls):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    result = cli("chat", pdf, "-p", "2", "--model", tiny_model, *FAST, input="One?\n/reset\nTwo?\n")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 1]
    assert model_calls[0]["images"] == model_calls[1]["images"] and model_calls[0]["crops"] == 5
    assert model_calls[1]["input_ids"].shape[1] < model_calls[0]["input_ids"].shape[1] + 5  # no history


@pytest.mark.parametrize(("script", "code", "status"), [("/nope\n", "usage", 2), ("/pages 9\n", "page_out_of_range", 4),
                                                      ("/pages x-\n", "usage", 2)])
def test_a_bad_line_is_one_error_and_the_scripted_conversation_goes_on(cli, tiny_model, tmp_path, script, code,
                                                                      status):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input="First?\n" + script + "Second?\n")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error [{code}]"), result.stderr
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 2]
    assert result.exit_code == status  # the status of the first failed line


@pytest.mark.parametrize(("script", "answered", "status"), [
    ("First?\n/quit\nSecond?\n", [1], 0), ("/exit\nFirst?\n", [], 0), ("First?\n/bye\n/nope\n", [1], 0),
    ("/nope\nFirst?\n/quit\nSecond?\n", [1], 2)])
def test_piped_quit_leaves_and_the_lines_after_it_are_not_read(cli, tiny_model, tmp_path, model_calls, script,
                                                              answered, status):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input=script)
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == answered
    assert len(model_calls) == len(answered)
    assert result.exit_code == status, result.stderr  # the status so far: a line failed before /quit, or none
    assert result.stderr.count("error [") == (status != 0), result.stderr


class Terminal:
    """`idefics chat` on a real pseudo-terminal (stdin, stdout and stderr are all the tty)."""

    def __init__(self, *args: str, stdout: str | None = None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            if stdout:  # stdout elsewhere (a file, /dev/full): stdin and stderr stay the tty
                os.dup2(os.open(stdout, os.O_WRONLY), 1)
            # NOFLSH: a Ctrl-C must not make the tty drop the output this reader has not read yet (up to a few
            # KB while a test sleeps), or an answer the program did write would be missing from `seen`
            attrs = termios.tcgetattr(0)
            attrs[3] |= termios.NOFLSH
            termios.tcsetattr(0, termios.TCSANOW, attrs)
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "idefics_cli", "chat", *args])
        self.seen = b""
        self.pos = 0
        self.status = None

    def wait_for(self, token: bytes, timeout: float = 120) -> bool:
        """Read until `token` shows up after the previous match."""
        end = time.monotonic() + timeout
        while True:
            found = self.seen.find(token, self.pos)
            if found >= 0:
                self.pos = found + len(token)
                return True
            if time.monotonic() > end:
                return False
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:
                    return False

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 30) -> int | None:
        end = time.monotonic() + timeout
        while self.status is None and time.monotonic() < end:
            self.wait_for(b"\x00", 0.2)  # keep draining the terminal
            done, status = os.waitpid(self.pid, os.WNOHANG)
            self.status = status if done else None
        return None if self.status is None else os.waitstatus_to_exitcode(self.status)

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_terminal_session_streams_saves_and_leaves_on_ctrl_d(tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    term = Terminal(pdf, "--model", tiny_model, *FAST)
    try:
        assert term.wait_for(b">>> "), term.seen[-2000:]
        mark = term.pos
        term.type("What is it?\r")
        assert term.wait_for(b"\n>>> "), term.seen[-2000:]
        assert b'"schema"' not in term.seen[mark:]  # a terminal gets the streamed text, not JSON
        term.type(f"/save {tmp_path / 's.json'}\r")
        assert term.wait_for(b"saved 2 messages"), term.seen[-2000:]
        assert term.wait_for(b">>> "), term.seen[-2000:]
        time.sleep(0.5)  # let readline put the terminal in raw mode before the Ctrl-D arrives
        term.type("\x04")  # Ctrl-D
        assert term.exit_code() == 0, term.seen[-2000:]
    finally:
        term.close()
    data = json.loads((tmp_path / "s.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["content"][0]["text"].encode() in term.seen.replace(b"\r\n", b"\n")


def test_terminal_ctrl_c_during_an_answer_keeps_it_marked_interrupted(tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    term = Terminal(pdf, "--model", tiny_model, "--quant", "none", "--device", "cpu", "--max-new-tokens", "4000",
                    "--dpi", "40")
    try:
        assert term.wait_for(b">>> "), term.seen[-2000:]
        term.type("What is it?\r")
        assert term.wait_for(b"What is it?"), term.seen[-2000:]
        started = len(term.seen)
        while len(term.seen) < started + 200 and term.wait_for(b" ", 5):  # well into a 4000-token answer
            pass
        term.type("\x03")
        assert term.wait_for(b"interrupted"), term.seen[-2000:]
        assert term.wait_for(b">>> "), term.seen[-2000:]
        mark = term.pos
        term.type(f"/save {tmp_path / 's.json'}\r")
        assert term.wait_for(b"saved 2 messages"), term.seen[-2000:]
        assert term.wait_for(b">>> "), term.seen[-2000:]
        time.sleep(0.5)
        assert term.seen.count(b">>> ", mark) == 1  # the prompt once, not once per stream
        term.type("\x04")
        assert term.exit_code() == 0, term.seen[-2000:]
    finally:
        term.close()
    assert term.seen.count(b">>> ") == 3  # the first question, after the stopped answer, after /save
    saved = json.loads((tmp_path / "s.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["interrupted"] is True
    assert saved[1]["content"][0]["text"].encode() in term.seen.replace(b"\r\n", b"\n")


def test_terminal_ctrl_c_at_the_prompt_stays_sigterm_leaves(tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    term = Terminal(pdf, "--model", tiny_model, *FAST)
    try:
        assert term.wait_for(b">>> "), term.seen[-2000:]
        time.sleep(0.5)
        term.type("\x03")  # Ctrl-C at the prompt: a fresh prompt, still running
        assert term.wait_for(b">>> ", 10)  # a new prompt
        assert term.exit_code(2) is None
        os.kill(term.pid, signal.SIGTERM)
        assert term.exit_code() == 130, term.seen[-2000:]
    finally:
        term.close()
    assert b"interrupted" in term.seen


def test_save_is_atomic_and_a_failed_save_leaves_nothing_behind(cli, tiny_model, tmp_path):
    """`/save` onto a folder fails as one output_error line; no temporary file is left beside it (writers.py)."""
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    folder = tmp_path / "taken"
    folder.mkdir()
    saved = tmp_path / "ok.json"
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input=f"One?\n/save {folder}\n/save {saved}\n")
    assert result.exit_code == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [output_error]"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "r.pdf", "taken"]
    assert list(folder.iterdir()) == []
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"]


def test_library_session_commits_each_turn_when_its_answer_is_read(engine, tmp_path):
    """conversation.ChatSession: the turn joins the conversation once read; a closed answer is kept, interrupted."""
    from idefics_cli.tasks.conversation import ChatSession

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    chat = ChatSession.open(pdf, "1", dpi=40).start(engine)
    try:
        first = chat.ask("What is it?")
        assert chat.turn == 0  # nothing read yet
        record = first.to_dict()
        assert record["turn"] == 1 and list(record)[:2] == ["schema", "turn"] and chat.turn == 1
        assert chat.messages[-1] == assistant_turn(first.text)
        chat.show("2")
        second = chat.ask("And now?", max_new_tokens=50)
        piece = next(iter(second))
        second.close()
        assert chat.turn == 2 and chat.messages[-1]["interrupted"] is True
        assert chat.messages[-1]["content"][0]["text"] == piece
        assert second.to_dict()["sources"] == [{"path": pdf, "pages": [1, 2]}]
        assert chat.save(str(tmp_path / "c.json")) == 4
    finally:
        chat.close()


def test_a_turn_asked_before_the_last_answer_was_read_stops_that_answer_and_keeps_the_order(engine, tmp_path):
    """An answer left half-read (or unread) when the next question comes is stopped and committed, interrupted, as
    far as it went: the conversation keeps its turns in order, each with its pages, and the next answer works."""
    from idefics_cli.tasks.conversation import ChatSession

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    chat = ChatSession.open(pdf, "1", dpi=40).start(engine)
    try:
        first = chat.ask("one", max_new_tokens=50)
        piece = next(iter(first))
        second = chat.ask("two", max_new_tokens=5)
        assert first.done and first.interrupted and first.text == piece  # stopped: reading it later adds nothing
        unread = chat.ask("three", max_new_tokens=5)  # `second` was never read
        assert second.interrupted and second.text == "" and unread.text
        questions = [m["content"][-1]["text"] for m in chat.messages if m["role"] == "user"]
        assert questions == ["one", "two", "three"]
        assert [len(m["content"]) for m in chat.messages if m["role"] == "user"] == [2, 1, 1]  # the page: turn one
        assert [m.get("interrupted", False) for m in chat.messages if m["role"] == "assistant"] == [True, True, False]
        assert unread.to_dict()["turn"] == 3 and chat.turn == 3
        fourth = chat.ask("four", max_new_tokens=5)
        chat.show("2")  # the pages of the next question, not of the answer left unread
        assert fourth.interrupted and chat.messages[-2]["content"] == [{"type": "text", "text": "four"}]
        assert chat.pending and chat.ask("five", max_new_tokens=5).to_dict()["sources"][0]["pages"] == [1, 2]
    finally:
        chat.close()


def test_a_piped_line_that_is_not_utf8_is_one_usage_error_and_the_conversation_goes_on(cli, tiny_model, tmp_path):
    """stdin read strictly (a UTF-8 locale) died on the first undecodable byte before any answer; read leniently
    (C locale) the line reached the tokenizer as lone surrogates: an internal error either way."""
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    saved = tmp_path / "c.json"
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input=f"One?\nTwo \xff\xfe?\nThree?\n/save {saved}\n"
                 .encode("latin-1"))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [usage]: the question is not valid UTF-8"), result.stderr
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 2]
    assert result.exit_code == 2
    assert len(json.loads(saved.read_text())["messages"]) == 4


def test_terminal_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8:strict")  # as a UTF-8 locale reads a terminal
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    term = Terminal(pdf, "--model", tiny_model, *FAST)
    try:
        assert term.wait_for(b">>> "), term.seen[-2000:]
        os.write(term.fd, b"Two \xff?\r")
        assert term.wait_for(b"error [usage]: the question is not valid UTF-8"), term.seen[-2000:]
        assert term.wait_for(b">>> "), term.seen[-2000:]
        term.type("What is it?\r")
        assert term.wait_for(b"\n>>> "), term.seen[-2000:]
        time.sleep(0.5)
        term.type("\x04")
        assert term.exit_code() == 0, term.seen[-2000:]
    finally:
        term.close()


def test_save_of_a_document_whose_name_is_not_utf8(cli, tiny_model, tmp_path):
    """The file's `sources` path holds lone surrogates: `/save` raised an internal UnicodeEncodeError that ended the
    chat, the conversation lost; JSON now escapes them (as the JSON lines do), and the name reads back."""
    pdf = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"r\xff.pdf"))
    os.rename(make_pdf(tmp_path / "r.pdf", n_pages=1), pdf)
    saved = tmp_path / "c.json"
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input=f"One?\n/save {saved}\nTwo?\n")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 2]
    assert json.loads(saved.read_text())["sources"] == [{"message": 0, "path": pdf, "pages": [1]}]


def test_a_piped_script_with_a_byte_order_mark_runs_its_first_command(cli, tiny_model, tmp_path, model_calls):
    """A script saved by Notepad or piped from PowerShell starts with a BOM: `\\ufeff/pages 2` was asked as a
    question (about every page) instead of choosing page 2."""
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input="\ufeff/pages 2\r\nWhat is it?\r\n".encode())
    assert result.exit_code == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(a["question"], a["sources"]) for a in answers] == [("What is it?", [{"path": pdf, "pages": [2]}])]


def test_save_onto_the_document_itself_is_refused(cli, tiny_model, tmp_path):
    """`/save r.pdf` (a slip for r.json) replaced the very PDF the chat is about with the JSON conversation."""
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    before = open(pdf, "rb").read()
    link = tmp_path / "same.pdf"
    os.symlink(pdf, link)
    result = cli("chat", pdf, "--model", tiny_model, *FAST, input=f"One?\n/save {pdf}\n/save {link}\nTwo?\n")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error [usage]: ") for line in lines), result.stderr
    assert result.exit_code == 2 and [json.loads(line)["turn"] for line in result.stdout.splitlines()] == [1, 2]
    assert open(pdf, "rb").read() == before and os.path.islink(link)


def test_save_onto_a_symlink_writes_its_target_and_keeps_the_link(engine, tmp_path):
    """`/save PATH` with PATH a symlink replaced the link with a regular file; as `>` does, the target gets it."""
    from idefics_cli.tasks.conversation import ChatSession

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    (tmp_path / "keep").mkdir()
    target, link = tmp_path / "keep" / "c.json", tmp_path / "c.json"
    target.write_text("old")
    os.symlink(target, link)
    chat = ChatSession.open(pdf, dpi=40).start(engine)
    try:
        assert chat.save(str(link)) == 0
    finally:
        chat.close()
    assert os.path.islink(link) and json.loads(target.read_text())["schema"] == "idefics-cli.chat/1"


def test_a_closed_stdin_is_an_empty_script(tiny_model, tmp_path):
    """stdin closed (`<&-`, a service without one): `sys.stdin` is None and the chat crashed with an internal
    TypeError; it is the end of input, as /dev/null is: exit 0, nothing written."""
    import subprocess

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    result = subprocess.run([sys.executable, "-m", "idefics_cli", "chat", pdf, "--model", tiny_model, *FAST],
                            capture_output=True, timeout=300, preexec_fn=lambda: os.close(0),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout == b"" and b"error" not in result.stderr, result.stderr


def test_save_onto_the_chats_own_stdout_or_stdin_is_refused_and_the_answers_stay(tiny_model, tmp_path):
    """`/save /dev/stdout` with stdout redirected to a file replaced that file by the chat JSON: every answer line,
    those before and after, was lost (exit 0). Saving onto the chat's stdin, stdout or stderr is a usage error now."""
    import subprocess

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    script = tmp_path / "script.txt"
    script.write_text(f"One?\n/save /dev/stdout\n/save {script}\nTwo?\n")
    answers = tmp_path / "answers.jsonl"
    with open(script, "rb") as stdin, open(answers, "wb") as stdout:
        result = subprocess.run([sys.executable, "-m", "idefics_cli", "chat", pdf, "--model", tiny_model, *FAST],
                                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert [json.loads(line)["turn"] for line in answers.read_text().splitlines()] == [1, 2], answers.read_text()
    assert script.read_text().startswith("One?\n")  # the questions being read are not overwritten either
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 2 and all(e.startswith("error [usage]: /save ") for e in errors), errors
    assert result.returncode == 2


@pytest.mark.parametrize("stdout", ["closed", "/dev/full"])
def test_a_stdout_that_cannot_be_written_ends_the_chat(tiny_model, tmp_path, stdout):
    """stdout full (ENOSPC) or closed: the chat went on answering every line, the later answers going to /dev/null
    without a word (full) or each one more error line (closed). Now the first failed write is the one error line and
    the chat ends there (exit 4): the lines after it, the /save too, are not read."""
    import subprocess

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    saved = tmp_path / "chat.json"
    script = f"One?\nTwo?\nThree?\n/save {saved}\n".encode()
    with open(os.devnull if stdout == "closed" else stdout, "wb") as sink:
        result = subprocess.run([sys.executable, "-m", "idefics_cli", "chat", pdf, "--model", tiny_model, *FAST],
                                input=script, stdout=sink, stderr=subprocess.PIPE, timeout=300,
                                preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error [output_error]: cannot write to stdout"), errors
    assert result.returncode == 4 and not saved.exists()


def test_terminal_chat_with_a_full_stdout_is_one_output_error(tiny_model, tmp_path):
    """A typed chat whose stdout is on a full disk (`idefics chat doc > log` with no space) stopped at the first prompt
    with `error [internal]` (exit 1, "this is a bug"): input() flushed the broken stdout. The prompt now reads the
    line without touching stdout, and the first answer that cannot be written ends the chat (output_error, exit 4)."""
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    term = Terminal(pdf, "--model", tiny_model, *FAST, stdout="/dev/full")
    try:
        assert term.wait_for(b">>> "), term.seen[-2000:]
        term.type("What is it?\r")
        assert term.wait_for(b"error [output_error]: cannot write to stdout"), term.seen[-2000:]
        assert term.exit_code() == 4, term.seen[-2000:]
        assert b"internal" not in term.seen, term.seen[-2000:]
    finally:
        term.close()
