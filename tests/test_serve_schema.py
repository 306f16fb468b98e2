"""`idefics serve` with `response_format` (json_schema, json_object): a real server and the openai client.

The constrained answer to a question that carries `structured.with_schema`'s text equals `idefics ask --schema`'s
on the same model, page and question (the sharp tiny model, float32 CPU, no split); constrained and free rows
decoding in one batch give what each gives alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from conftest import make_image
from test_serve import Server, data_url, image_message
from test_structured import QUESTION, SCHEMAS

from idefics_cli import structured as st

openai = pytest.importorskip("openai")

FLAGS = ["--quant", "none", "--device", "cpu", "--no-split", "--max-new-tokens", "80"]
INVOICE = SCHEMAS[0]  # vendor (string, at most 12) and total (0..1000)
FLAGS_SCHEMA = SCHEMAS[9]  # the concise syntax: two booleans


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "fields", "strict": True, "schema": schema}}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema-page") / "page.png"
    make_image(320, 240, seed=5).save(path)
    return str(path)


@pytest.fixture(scope="module")
def server(sharp_model):
    srv = Server(sharp_model, "--max-batch", "4", "--max-new-tokens", "80")
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


def ask(client, page, question, response_format=None, max_tokens=80):
    from PIL import Image

    extra = {"response_format": response_format} if response_format else {}
    done = client.chat.completions.create(model="x", messages=[image_message(data_url(Image.open(page)), question)],
                                          max_tokens=max_tokens, **extra)
    return done.choices[0].message.content, done.choices[0].finish_reason


def test_json_schema_answer_equals_ask_schema(server, sharp_model, page, cli):
    res = cli("ask", page, QUESTION, "--schema", json.dumps(INVOICE), "--json", "--model", sharp_model, *FLAGS)
    assert res.exit_code == 0, res.stderr
    ref = json.loads(res.stdout)
    content, finish = ask(server.client(), page, st.with_schema(QUESTION, st.parse_schema(json.dumps(INVOICE))),
                          json_schema(INVOICE))
    assert (content, finish) == (ref["answer"], ref["finish_reason"]) == (json.dumps(ref["data"]), "stop")
    jsonschema.validate(json.loads(content), INVOICE)


def test_constrained_and_free_rows_in_one_batch_answer_as_alone(server, page):
    client = server.client()
    bools = st.parse_schema(FLAGS_SCHEMA)
    runs = [(QUESTION, json_schema(INVOICE)), ("Paid? Late?", json_schema(bools.schema)), (QUESTION, None, 24),
            ("Describe it", {"type": "json_object"}, 24)]  # the free rows would run to 80 tokens: 24 will do
    alone = [ask(client, page, *run) for run in runs]
    with ThreadPoolExecutor(len(runs)) as pool:
        together = list(pool.map(lambda run: ask(client, page, *run), runs))
    assert together == alone
    assert server.health()["steps"] > 0
    (invoice, f1), (flags, f2), (free, _), (anything, f4) = alone
    assert (f1, f2) == ("stop", "stop")
    jsonschema.validate(json.loads(invoice), INVOICE)
    jsonschema.validate(json.loads(flags), bools.schema)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # the free row was left alone: the random model writes no JSON
    assert anything.startswith("{")  # json_object: any object (the random model may not close it in 24 tokens)
    if f4 == "stop":
        assert isinstance(json.loads(anything), dict)


def test_a_bad_schema_is_a_400_with_the_usage_code(server, page):
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client(), page, QUESTION, json_schema({"type": "object", "oneOf": [{"type": "object"}]}))
    error = info.value.body
    assert info.value.status_code == 400 and error["code"] == "usage"
    assert error["param"] == "response_format.json_schema.schema" and "'oneOf'" in error["message"]
