"""OpenAI chat bodies -> the conversation the model sees (requests.py), the server's config checks and the
command's import hygiene; no model, no server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from conftest import make_image, make_pdf

from idefics_cli.errors import UsageError
from idefics_cli.serve.config import ServeConfig, check, is_loopback
from idefics_cli.serve.requests import RequestError, parse


def png_url(seed=0) -> str:
    buf = io.BytesIO()
    make_image(seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_parts_become_images_first_then_text_and_earlier_turns_keep_their_images(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", 4)
    data = base64.b64encode(open(pdf, "rb").read()).decode()
    req = parse({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image_url",
                                                                           "image_url": {"url": png_url()}},
                                     {"type": "file", "file": {"file_data": data, "pages": "-2"}},
                                     {"type": "text", "text": "these."}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "And now?"}], "max_completion_tokens": 5, "stop": "\n\n"})
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"] == [{"type": "image"}] * 3 + [{"type": "text", "text": "Compare\nthese."}]
    assert [p for _, p in req.pages] == [1, 3, 4]
    assert req.max_tokens == 5 and req.stop == ["\n\n"] and req.temperature == 0.0
    images, digests = req.render()
    assert len(images) == 3 and digests == [] and req.pages == []


@pytest.mark.parametrize("body,code,param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "file:///etc/passwd"}}]}]},
     "usage", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "usage", "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "/etc/hosts"}}]}]},
     "corrupt", "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "usage", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "usage", "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": "7"}, "usage", "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "usage", "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "usage", "tools"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "x"}]}, "usage", "messages[0].content[0]"),
    ([], "usage", None),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "usage", "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "usage", "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,\ud800"}}]}]},
     "corrupt", "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "é"}}]}]},
     "corrupt", "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBERi0=",
                                                                          "password": "\ud800"}}]}]},
     "usage", "messages[0].content[0].file.password"),  # not `corrupt`: the PDF is not at fault
    ({"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": "no"}},
     "usage", "stream_options.include_usage"),
])
def test_bad_requests_name_their_code_and_param(body, code, param):
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.code == code and info.value.param == param


def test_pdf_pages_render_at_the_models_size(tmp_path):
    """The server renders a file part's PDF pages as the CLI does for its model (the family's longest side)."""
    data = base64.b64encode(open(make_pdf(tmp_path / "r.pdf", 1), "rb").read()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": data}}]}]}
    sides = []
    for longest in (None, 2048):
        req = parse(body, longest_side=longest)
        sides.append(max(req.render()[0][0].size))
    assert sides == [1960, 2048]  # Idefics2's default, an Idefics3 processor's longest_edge


def test_page_images_are_capped_before_anything_renders(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", 5)
    data = base64.b64encode(open(pdf, "rb").read()).decode()
    with pytest.raises(RequestError) as info:
        parse({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": data}}]}]},
              max_images=4)
    assert info.value.code == "usage" and "more than 4" in info.value.message


def test_unsafe_settings_are_refused():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(UsageError, match="without an API key"):
        check(ServeConfig(host="0.0.0.0"))
    check(ServeConfig(host="0.0.0.0", api_key="k"))
    with pytest.raises(UsageError):
        check(ServeConfig(api_key="  "))


def test_help_imports_no_server_or_model_stack():
    code = ("import sys\nfrom idefics_cli.cli import app\n"
            "for args in (['--help'], ['serve', '--help']):\n"
            "    try:\n        app(args, prog_name='idefics')\n    except SystemExit:\n        pass\n"
            "heavy = ('torch', 'transformers', 'fastapi', 'starlette', 'uvicorn', 'pymupdf', 'PIL')\n"
            "print(json.dumps([m for m in heavy if m in sys.modules]))\n")
    res = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout.decode().strip().splitlines()[-1]) == []


def test_serve_help_reads_like_the_other_commands():
    import re

    from typer.testing import CliRunner

    from idefics_cli.cli import app

    text = CliRunner().invoke(app, ["serve", "--help"], prog_name="idefics", terminal_width=200).stdout
    assert text.splitlines()[0] == "Usage: idefics serve [OPTIONS]"
    assert not re.search(r"<(str|int|float|list\[str\]|int range)>|\[\[|\{", text), text
    assert "--api-key KEY" in text and "--max-batch N" in text and "--cache-mb MB" in text


# ---- response_format (structured output) ------------------------------------------------------------------
def test_response_format_kinds():
    from idefics_cli import structured as st

    messages = [{"role": "user", "content": "Fields?"}]
    assert parse({"messages": messages}).schema is None
    assert parse({"messages": messages, "response_format": {"type": "text"}}).schema is None
    assert parse({"messages": messages, "response_format": {"type": "json_object"}}).schema == st.permissive_object()
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    req = parse({"messages": messages, "response_format": {"type": "json_schema", "json_schema": {
        "name": "invoice", "strict": True, "schema": schema}}})
    assert req.schema.schema == schema and req.schema.sha256 == st.parse_schema("total float").sha256
    assert req.messages == [{"role": "user", "content": [{"type": "text", "text": "Fields?"}]}]  # unchanged


@pytest.mark.parametrize("fmt, param, says", [
    ({"type": "xml"}, "response_format.type", "text, json_object or json_schema"),
    ("json", "response_format.type", "text, json_object or json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema", "an object with a schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "response_format.json_schema.name", "string"),
    ({"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}}, "response_format.json_schema.strict",
     "true or false"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}},
     "response_format.json_schema.schema", "keyword 'uniqueItems' at /uniqueItems"),
    ({"type": "json_schema", "json_schema": {"schema": {"$schema": 5}}}, "response_format.json_schema.schema",
     "'$schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}, "response_format.json_schema.schema",
     "invalid JSON Schema"),
])
def test_bad_response_formats_are_usage_errors_naming_their_param(fmt, param, says):
    with pytest.raises(RequestError) as info:
        parse({"messages": [{"role": "user", "content": "Fields?"}], "response_format": fmt})
    assert (info.value.code, info.value.param) == ("usage", param) and says in info.value.message
    assert "--schema" not in info.value.message


def test_the_data_scheme_is_case_insensitive(tmp_path):
    """`DATA:` is the same scheme as `data:` (RFC 3986): an image_url or file_data spelled so is read, not refused
    as a URL the server would have to fetch, nor as bad base64."""
    pdf = "DATA:application/pdf;base64," + base64.b64encode(open(make_pdf(tmp_path / "r.pdf", 2), "rb").read()).decode()
    req = parse({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "DATA" + png_url()[4:]}},
        {"type": "file", "file": {"file_data": pdf, "pages": "2"}}, {"type": "text", "text": "What?"}]}]})
    assert [page for _, page in req.pages] == [1, 2]
    req.close()
