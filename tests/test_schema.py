"""`--schema` end to end: ask (and --each-page), chat, transcribe (records, resume, batches) and the library's
`schema=`, on the tiny model with the real idefics2 tokenizer and real llguidance (structured.py's own tests are
tests/test_structured.py; the server's response_format is tests/test_serve_schema.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import make_image, make_pdf, run_traced
from test_structured import QUESTION, SCHEMAS

from idefics_cli import Model
from idefics_cli import structured as st
from idefics_cli.tasks.records import settings_hash
from idefics_cli.tasks.transcription import TranscribeRequest

FAST = ["--quant", "none", "--device", "cpu", "--max-new-tokens", "80", "--no-split"]  # one image a page: faster
BOOLS = "paid bool\nlate bool: is it overdue"  # the concise syntax; bounded values, so the tiny model ends its JSON


def valid(data, schema) -> bool:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).is_valid(data)


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "invoice.png"
    make_image(seed=0).save(path)
    return str(path)


# ---- ask ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2, 4, 9])
def test_ask_answers_parse_and_validate_text_and_json(cli, tiny_model, tmp_path, page, k):
    """A schema file, inline JSON or the concise syntax: text mode prints the JSON object, --json adds data."""
    value = SCHEMAS[k]
    if isinstance(value, dict) and k == 0:
        path = tmp_path / "invoice.schema.json"
        path.write_text(json.dumps(value, indent=2))
        arg = str(path)
    else:
        arg = value if isinstance(value, str) else json.dumps(value)
    schema = st.parse_schema(arg)
    text = cli("ask", page, QUESTION, "--schema", arg, "--model", tiny_model, *FAST)
    assert text.exit_code == 0, text.stderr
    printed = json.loads(text.stdout)
    assert valid(printed, schema.schema) and text.stdout == json.dumps(printed, ensure_ascii=False) + "\n"
    res = cli("ask", page, QUESTION, "--schema", arg, "--json", "--model", tiny_model, *FAST)
    assert res.exit_code == 0, res.stderr
    answer = json.loads(res.stdout)
    assert list(answer)[:4] == ["schema", "question", "answer", "data"] and answer["question"] == QUESTION
    assert answer["data"] == printed == json.loads(answer["answer"]) and answer["finish_reason"] == "stop"
    assert answer["schema_sha256"] == schema.sha256 and "error" not in answer


def test_ask_without_schema_has_no_data_fields(cli, tiny_model, page):
    res = cli("ask", page, QUESTION, "--json", "--model", tiny_model, "--quant", "none", "--max-new-tokens", "4")
    answer = json.loads(res.stdout)
    assert res.exit_code == 0 and not {"data", "schema_sha256", "error"} & set(answer)


def test_a_truncated_answer_gives_null_data_its_code_and_exit_5(cli, tiny_model, page):
    args = ["ask", page, QUESTION, "--schema", "vendor, total float", "--model", tiny_model, "--quant", "none",
            "--max-new-tokens", "12", "--no-split"]  # an unbounded string: the model does not close it in 12 tokens
    res = cli(*args, "--json")
    assert res.exit_code == 5, res.stderr
    answer = json.loads(res.stdout)
    assert answer["finish_reason"] == "length" and answer["answer"].startswith('{"vendor": "')
    assert answer["data"] is None and answer["error"]["code"] == "schema_truncated"
    text = cli(*args)
    assert text.exit_code == 5 and text.stdout == ""  # never half a JSON object on stdout
    assert text.stderr.startswith("error [schema_truncated]: the answer was cut at --max-new-tokens 12")


def test_each_page_with_a_schema(cli, tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    res = cli("ask", pdf, QUESTION, "--each-page", "--json", "--schema", BOOLS, "--dpi", "72", "--model", tiny_model,
              *FAST)
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [a["sources"][0]["pages"] for a in lines] == [[1], [2]]
    assert all(set(a["data"]) == {"paid", "late"} for a in lines)
    text = cli("ask", pdf, QUESTION, "--each-page", "--schema", BOOLS, "--dpi", "72", "--model", tiny_model, *FAST)
    chunks = text.stdout.splitlines()
    assert chunks[0] == f"==> {pdf} [page 1] <==" and json.loads(chunks[1]) == lines[0]["data"]


@pytest.mark.parametrize("command", ["ask", "chat", "transcribe"])
@pytest.mark.parametrize("value, named", [
    ('{"type": "object", "oneOf": [{"type": "object"}]}', "'oneOf'"),
    ("total integer", "'integer'"),
    ("missing/invoice.schema.json", "no such schema file"),
])
def test_a_bad_schema_exits_2_before_anything_loads(tiny_model, tmp_path, page, command, value, named):
    args = {"ask": [page, QUESTION], "chat": [page], "transcribe": [page, "--out", str(tmp_path / "r.jsonl")]}
    res, imported = run_traced(command, *args[command], "--schema", value, "--model", tiny_model, tmp_path=tmp_path,
                               input=b"Total?\n")
    stderr = res.stderr.decode()
    assert res.returncode == 2 and stderr.startswith("error [usage]: ") and named in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and res.stdout == b""
    assert imported == []  # neither torch nor transformers: nothing started loading
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("command", ["ask", "transcribe"])
def test_a_schema_the_grammar_cannot_build_is_a_usage_error_before_the_model_loads(tmp_path, page, command):
    """Contradictory bounds fail in llguidance: still exit 2, before a model that does not exist is even looked
    at, and without torch (llguidance checks the grammar without a tokenizer)."""
    args = [page, QUESTION] if command == "ask" else [page, "--out", str(tmp_path / "r.jsonl")]
    res, imported = run_traced(command, *args, "--schema", '{"type": "integer", "minimum": 5, "maximum": 3}',
                               "--offline", "--model", str(tmp_path / "no-model"), tmp_path=tmp_path)
    stderr = res.stderr.decode()
    assert res.returncode == 2 and "grammar" in stderr and "minimum (5) is greater than maximum (3)" in stderr, stderr
    assert imported == []


# ---- chat -----------------------------------------------------------------------------------------------
def test_chat_turns_with_a_schema(cli, tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    res = cli("chat", pdf, "--schema", BOOLS, "--dpi", "40", "--model", tiny_model, *FAST,
              input=f"{QUESTION}\nAnd on second thought?\n/save {tmp_path / 'c.json'}\n")
    assert res.exit_code == 0, res.stderr
    turns = [json.loads(line) for line in res.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    schema = st.parse_schema(BOOLS)
    assert all(valid(t["data"], schema.schema) and t["schema_sha256"] == schema.sha256 for t in turns)
    assert turns[0]["question"] == QUESTION
    saved = json.loads((tmp_path / "c.json").read_text())
    first_user = saved["messages"][0]["content"][-1]["text"]
    assert first_user == st.with_schema(QUESTION, schema)  # the conversation keeps what the model was asked


def test_chat_line_without_valid_json_is_an_error_line_and_the_chat_goes_on(cli, tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=1)
    res = cli("chat", pdf, "--schema", "vendor, total float", "--dpi", "40", "--model", tiny_model, "--quant",
              "none", "--max-new-tokens", "6", input="Who?\nAnd?\n")
    assert res.exit_code == 5
    turns = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(t["turn"], t["data"], t["error"]["code"]) for t in turns] == [(1, None, "schema_truncated"),
                                                                          (2, None, "schema_truncated")]
    assert res.stderr.count("error [schema_truncated]") == 2


# ---- transcribe -------------------------------------------------------------------------------------------
def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_transcribe_records_have_data_and_resume_by_schema(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_pdf(tmp_path / "invoice.pdf", 2)
    first = json.dumps(SCHEMAS[4])
    args = ["transcribe", "invoice.pdf", "--out", "r.jsonl", "--batch-size", "2", "--dpi", "72", "--model",
            tiny_model, *FAST]
    res = cli(*args, "--schema", first)
    assert res.exit_code == 0, res.stderr
    records = read("r.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok"] and len({r["settings"] for r in records}) == 1
    for r in records:
        assert valid(r["data"], SCHEMAS[4]) and r["text"] == json.dumps(r["data"])
        assert list(r)[:7] == ["schema", "path", "page", "pages", "status", "text", "data"]
    # the same schema (another spelling of it): nothing is redone, and nothing heavy is imported
    spaced = json.dumps(SCHEMAS[4], indent=1)
    again, imported = run_traced(*args, "--schema", spaced, tmp_path=tmp_path, cwd=str(tmp_path))
    assert again.returncode == 0 and "nothing left to do" in again.stderr.decode(), again.stderr
    assert imported == [] and len(read("r.jsonl")) == 2
    # another schema: every page is redone, under another settings hash
    res = cli(*args, "--schema", BOOLS)
    assert res.exit_code == 0, res.stderr
    records = read("r.jsonl")
    assert len(records) == 4 and records[2]["settings"] != records[0]["settings"]
    assert all(set(r["data"]) == {"paid", "late"} for r in records[2:])
    # without a schema: redone again, and the records have no data field
    res = cli(*args)
    assert res.exit_code == 0 and all("data" not in r for r in read("r.jsonl")[4:])


def test_a_truncated_page_is_an_error_record_that_keeps_its_text_and_is_retried(cli, tiny_model, tmp_path, page):
    out = tmp_path / "r.jsonl"
    args = ["transcribe", page, "--out", str(out), "--schema", "vendor, total float", "--model", tiny_model,
            "--quant", "none", "--max-new-tokens", "12", "--prompt", QUESTION, "--no-split"]
    res = cli(*args)
    assert res.exit_code == 4, res.stderr  # the one page failed: nothing readable (3 when other pages are done)
    (record,) = read(out)
    assert record["status"] == "error" and record["error"]["code"] == "schema_truncated"
    assert record["error"]["message"] == "the answer was cut at --max-new-tokens 12 before its JSON ended"  # as ask's
    assert record["data"] is None and record["text"].startswith('{"vendor": "') and record["finish_reason"] == "length"
    assert "failed: " in res.stderr and "schema_truncated" in res.stderr
    assert cli(*args).exit_code == 4 and len(read(out)) == 2  # resume retries it


def test_batched_constrained_pages_equal_single_pages(sharp_model, tmp_path):
    from idefics_cli.runtime.model import ModelOptions, load_engine

    engine = load_engine(ModelOptions(model=sharp_model, quant="none", device="cpu", max_new_tokens=80, split=False))
    pdf = make_pdf(tmp_path / "invoices.pdf", 2)  # one image a page (no split): the pages' answers differ
    runs = {}
    for size in (2, 1):
        records = list(Model(engine).transcribe(pdf, prompt=QUESTION, dpi=72, batch_size=size, schema=SCHEMAS[0]))
        assert [r.timing["batch_size"] for r in records] == [size] * 2
        runs[size] = [(r.page, r.status, r.text, r.data) for r in records]
    assert runs[2] == runs[1]
    assert len({text for _, _, text, _ in runs[1]}) > 1  # the pages' answers differ: the comparison means something
    assert all(status == "ok" and valid(data, SCHEMAS[0]) for _, status, _, data in runs[1])


def test_the_settings_hash_includes_the_schema_and_only_with_one():
    request = TranscribeRequest(["a.pdf"])
    opts = request.options
    assert request.settings_hash == settings_hash(model=opts.model, revision=None, quant=opts.quant, split=True,
                                                  render=1960, render_unit="longest_side", prompt=request.prompt,
                                                  max_new_tokens=opts.max_new_tokens)  # earlier records still resume
    one = TranscribeRequest(["a.pdf"], schema="total float")
    same = TranscribeRequest(["a.pdf"], schema={"type": "object", "required": ["total"],
                                                "properties": {"total": {"type": "number"}}})
    other = TranscribeRequest(["a.pdf"], schema="total int")
    assert one.settings_hash == same.settings_hash and len({request.settings_hash, one.settings_hash,
                                                            other.settings_hash}) == 3
    assert one.model_prompt == st.with_schema(request.prompt, one.schema) and request.model_prompt == request.prompt


# ---- library --------------------------------------------------------------------------------------------------
def test_library_ask_and_transcribe_take_a_schema(engine, page):
    schema = SCHEMAS[1]
    response = Model(engine).ask(page, QUESTION, schema=schema, max_new_tokens=80)
    assert valid(response.data, schema) and response.schema_error is None
    d = response.to_dict()
    assert d["data"] == response.data and d["schema_sha256"] == st.schema_hash(schema)
    concise = Model(engine).ask(page, QUESTION, schema=BOOLS, max_new_tokens=80)
    assert set(concise.data) == {"paid", "late"}
    plain = Model(engine).ask(page, QUESTION, max_new_tokens=4)
    assert plain.data is None and plain.schema_error is None and "data" not in plain.to_dict()
    cut = Model(engine).ask(page, QUESTION, schema="vendor, total float", max_new_tokens=12)
    assert cut.data is None and cut.schema_error.code == "schema_truncated" and cut.schema_error.exit_status == 5
    # the engine's 8 new tokens hold an enum's answer
    (record,) = Model(engine).transcribe(page, prompt=QUESTION, schema=json.dumps(SCHEMAS[3]))
    assert record.status == "ok" and record.data in SCHEMAS[3]["enum"] and record.to_dict()["data"] == record.data
