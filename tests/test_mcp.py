"""`idefics mcp` driven by the mcp package's own stdio client: one real subprocess for the module.

The server reads under two roots (a temporary folder holding symlinks that point out of both, then the bundled
samples/); every call of the module goes through one session (`session` runs them all, the tests read the results).
Answers are compared with the library's on the same tiny model and options (the session's `engine`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys

import pytest

mcp = pytest.importorskip("mcp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")
QUESTION = "What is the total amount due?"
FLAGS = ["--quant", "none", "--device", "cpu", "--max-new-tokens", "8"]  # the `engine` fixture's options


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    shared, outside = tmp_path_factory.mktemp("mcp-root"), tmp_path_factory.mktemp("mcp-outside")
    shutil.copy(os.path.join(SAMPLES, "invoice.pdf"), outside / "secret.pdf")
    os.symlink(outside / "secret.pdf", shared / "link.pdf")  # inside the root, pointing out of it
    os.symlink(outside / "secret.pdf", shared / "invoice.pdf")  # so relative "invoice.pdf" is samples/' own file
    (outside / "secret.json").write_text('{"type": "leaked-secret"}')
    os.mkfifo(shared / "pipe.pdf")  # no writer ever: opening it for reading blocks
    return {"root": str(shared), "outside": str(outside / "secret.pdf"), "stderr": str(outside / "stderr.txt"),
            "secret_json": str(outside / "secret.json")}


@pytest.fixture(scope="module")
def session(tiny_model, folders):
    """Start `idefics mcp`, make every call of the module, and return the results by name."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "idefics_cli", "mcp", "--root", folders["root"], "--root", SAMPLES, "--model", tiny_model, *FLAGS],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    invoice, receipt = os.path.join(SAMPLES, "invoice.pdf"), os.path.join(SAMPLES, "receipt.jpg")
    calls = {
        "pages": ("list_pages", {"path": os.path.join(SAMPLES, "report.pdf")}),
        "relative": ("list_pages", {"path": "invoice.pdf"}),  # looked up in the roots, past the first's link
        "ask": ("ask_document", {"path": invoice, "question": QUESTION, "pages": "1"}),
        "schema": ("ask_document", {"path": receipt, "question": "Who?", "schema": {"type": "object", "properties": {
            "merchant": {"type": "string"}}, "required": ["merchant"]}}),
        "transcribe": ("transcribe_document", {"path": receipt}),
        "outside": ("list_pages", {"path": folders["outside"]}),
        "outside_ask": ("ask_document", {"path": folders["outside"], "question": QUESTION}),
        "dotdot": ("transcribe_document", {"path": os.path.join(SAMPLES, "..", "pyproject.toml")}),
        "symlink": ("ask_document", {"path": os.path.join(folders["root"], "link.pdf"), "question": QUESTION}),
        "missing": ("list_pages", {"path": os.path.join(SAMPLES, "nothing.pdf")}),
        "bad_pages": ("ask_document", {"path": invoice, "question": QUESTION, "pages": "9"}),
        "schema_file": ("ask_document", {"path": invoice, "question": QUESTION, "schema": folders["secret_json"]}),
        "nul": ("list_pages", {"path": invoice + "\x00.txt"}),
        "nul_ask": ("ask_document", {"path": "\x00", "question": QUESTION}),
        "fifo": ("list_pages", {"path": "pipe.pdf"}),
        "empty": ("list_pages", {"path": " "}),
        "fifo_transcribe": ("transcribe_document", {"path": os.path.join(folders["root"], "pipe.pdf")}),
    }

    async def run():
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            out = {"tools": (await client.list_tools()).tools}
            for name, (tool, args) in calls.items():
                try:  # a call that hangs is that test's failure, not the module's
                    out[name] = await asyncio.wait_for(client.call_tool(tool, args), 60)
                except TimeoutError as exc:
                    out[name] = exc
            return out

    with open(folders["stderr"], "w") as errlog:  # the server's stderr: its own lines, the libraries' logs
        return asyncio.run(asyncio.wait_for(run(), 600))


def value(result) -> dict:
    assert not result.is_error, result.content
    text = json.loads(result.content[0].text)
    assert result.structured_content in (text, {"result": text})
    return text


def refusal(result) -> str:
    """The tool error's text: our one line alone, as the CLI prints it (no "Error executing tool NAME: " before it)."""
    assert result.is_error and len(result.content) == 1, result.content
    return result.content[0].text


def test_stdout_is_the_protocol_and_the_rest_goes_to_stderr(session, folders):
    with open(folders["stderr"]) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("idefics mcp: serving ") and "idefics mcp: model ready" in lines, lines


def test_the_three_tools_are_listed_with_their_arguments(session):
    tools = {t.name: t for t in session["tools"]}
    assert set(tools) == {"ask_document", "transcribe_document", "list_pages"}
    assert tools["ask_document"].input_schema["required"] == ["path", "question"]
    assert set(tools["ask_document"].input_schema["properties"]) == {"path", "question", "pages", "schema"}
    assert set(tools["transcribe_document"].input_schema["properties"]) == {"path", "pages"}
    assert all(t.description for t in tools.values())


def test_list_pages(session):
    from idefics_cli.documents import open_document

    path = os.path.join(SAMPLES, "report.pdf")
    doc = open_document(path)
    assert value(session["pages"]) == {"path": path, "format": "pdf", "pages": doc.page_count} and doc.page_count > 1
    doc.close()
    assert value(session["relative"])["path"] == os.path.join(SAMPLES, "invoice.pdf")  # not the link out of root 1


def test_a_relative_path_is_taken_from_the_first_root_where_it_stays_inside(tmp_path):
    """`x.pdf` under root A as a link out of the roots was refused although root B holds a real `x.pdf`."""
    from mcp.server.mcpserver.exceptions import ToolError

    from idefics_cli.mcp.server import resolve

    a, b, out = (os.path.realpath(tmp_path / name) for name in ("a", "b", "out"))
    for folder in (a, b, out):
        os.mkdir(folder)
    for folder in (b, out):
        shutil.copy(os.path.join(SAMPLES, "invoice.pdf"), os.path.join(folder, "x.pdf"))
    os.symlink(os.path.join(out, "x.pdf"), os.path.join(a, "x.pdf"))
    os.symlink(os.path.join(out, "x.pdf"), os.path.join(a, "only.pdf"))
    os.symlink(os.path.join(b, "x.pdf"), os.path.join(a, "across.pdf"))
    assert resolve([a, b], "x.pdf") == os.path.join(b, "x.pdf")
    assert resolve([a, b], "across.pdf") == os.path.join(b, "x.pdf")  # a link into another root is inside
    assert resolve([a, b], "missing.pdf") == os.path.join(a, "missing.pdf")  # not_found when opened, as before
    for path in ("only.pdf", os.path.join(a, "x.pdf")):  # no root gives an allowed file; absolute as before
        with pytest.raises(ToolError, match=r"^error \[permission_denied\]: "):
            resolve([a, b], path)


def test_ask_and_transcribe_answer_as_the_library_does(session, engine):
    from idefics_cli import Model

    model = Model(engine)
    local = model.ask(os.path.join(SAMPLES, "invoice.pdf"), QUESTION, pages="1")
    answer = value(session["ask"])
    assert answer["schema"] == "idefics-cli.answer/1" and answer["question"] == QUESTION
    assert answer["answer"] == local.text and answer["usage"] == local.usage
    assert answer["sources"] == [{"path": os.path.join(SAMPLES, "invoice.pdf"), "pages": [1]}]

    structured = value(session["schema"])
    assert structured["schema_sha256"] and "data" in structured  # the schema reached the model

    records = value(session["transcribe"])["records"]
    local_records = [r.to_dict() for r in model.transcribe([os.path.join(SAMPLES, "receipt.jpg")])]
    assert [r["status"] for r in records] == ["ok"] and records[0]["page"] == 1
    assert [r["text"] for r in records] == [r["text"] for r in local_records]


def test_paths_outside_the_roots_are_refused(session, folders):
    for name in ("outside", "outside_ask", "dotdot", "symlink"):
        message = refusal(session[name])
        assert message.startswith("error [permission_denied]") and "only files under the --root folders" in message
        assert "symlinks resolved" in message, message


def test_a_schema_naming_a_file_is_refused_unread(session, folders):
    """Only documents under the roots are read: a schema string naming a file (here outside them) is not opened."""
    message = refusal(session["schema_file"])
    assert message.startswith("error [usage]") and "leaked-secret" not in message, message


@pytest.mark.parametrize("text", ["invoice.yaml", "schemas/invoice", "invoice.schema.json"])
def test_schema_text_that_names_a_file_is_refused_as_the_cli_would_look_for_one(text):
    from idefics_cli.errors import UsageError
    from idefics_cli.mcp.server import unread

    with pytest.raises(UsageError, match="schema names a file"):
        unread(text)
    assert unread("vendor, total float").schema["required"] == ["vendor", "total"]


def test_document_errors_are_tool_errors_with_their_codes(session):
    path = os.path.join(SAMPLES, "nothing.pdf")
    assert refusal(session["missing"]) == f"error [not_found]: {path}: no such file (check the path)"
    assert refusal(session["bad_pages"]).startswith("error [page_out_of_range]")


def test_a_path_with_a_nul_or_naming_no_regular_file_is_a_usage_error(session):
    """A NUL in the path was an uncoded "Error executing tool" (a ValueError in realpath); a FIFO under a root hung
    the call for ever, waiting for a writer."""
    for name in ("nul", "nul_ask", "fifo", "fifo_transcribe", "empty"):
        assert not isinstance(session[name], Exception), (name, session[name])
        assert refusal(session[name]).startswith("error [usage]: "), (name, session[name].content)
    assert refusal(session["empty"]) == "error [usage]: the path is empty: give a document under the --root folders"


def test_without_the_extra_a_one_line_usage_error(tmp_path):
    import subprocess

    code = ("import sys\n"  # a finder that finds no mcp, as when it is not installed
            "class NoMcp:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'mcp':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoMcp())\n"
            "from idefics_cli.cli import app\n"
            "app(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", code, "mcp", "--root", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == ("error [usage]: `idefics mcp` needs the mcp extra (mcp is missing) "
                          "(pip install 'idefics-cli[mcp]')\n")
    run = subprocess.run([sys.executable, "-m", "idefics_cli", "mcp", "--root", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == "" and "is not a folder" in run.stderr


def test_a_closed_stdin_ends_the_server_at_once(tmp_path):
    """stdin closed (`<&-`): `sys.stdin` is None and the server crashed with an internal AttributeError; with no
    host to serve it exits 0, as when the host closes stdin."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "idefics_cli", "mcp", "--root", str(tmp_path), "--model",
                          str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.close(0), cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and run.stdout == "" and "error" not in run.stderr, run.stderr


def test_a_model_that_cannot_load_is_each_model_tools_error(tmp_path):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "idefics_cli", "mcp", "--root", SAMPLES, "--model", str(tmp_path / "no-model"), "--offline"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)

    async def run():
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            ask = await client.call_tool("ask_document", {"path": "invoice.pdf", "question": QUESTION})
            return ask, await client.call_tool("list_pages", {"path": "invoice.pdf"})

    with open(os.devnull, "w") as errlog:
        ask, pages = asyncio.run(asyncio.wait_for(run(), 120))
    assert refusal(ask).startswith("error [model_error]") and "no-model" in refusal(ask)
    assert value(pages)["pages"] >= 1  # documents are still listed


def test_with_server_a_running_idefics_serve_answers(tiny_model):
    """`idefics mcp --server URL`: no model in the MCP process; its answers are the server's (the library's client)."""
    pytest.importorskip("fastapi")
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from test_serve import KEY, Server

    import idefics_cli

    server = Server(tiny_model, "--api-key", KEY)
    try:
        server.wait_ready()
        params = StdioServerParameters(command=sys.executable, args=[
            "-m", "idefics_cli", "mcp", "--root", SAMPLES, "--server", server.url, "--api-key", KEY],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)

        async def run():
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                ask = await client.call_tool("ask_document", {"path": "invoice.pdf", "question": QUESTION,
                                                              "pages": "1"})
                return ask, await client.call_tool("transcribe_document", {"path": "receipt.jpg"})

        with open(os.devnull, "w") as errlog:
            ask, transcribed = asyncio.run(asyncio.wait_for(run(), 300))
        remote = idefics_cli.connect(server.url, api_key=KEY)
        expected = remote.ask(os.path.join(SAMPLES, "invoice.pdf"), QUESTION, pages="1")
        assert value(ask)["answer"] == expected.text and value(ask)["usage"] == expected.usage
        records = value(transcribed)["records"]
        assert [r["status"] for r in records] == ["ok"]
        assert records[0]["text"] == [r.text for r in remote.transcribe([os.path.join(SAMPLES, "receipt.jpg")])][0]
    finally:
        assert server.stop() == 0, "\n".join(server.lines)
