"""structured.py: schema parsing and checks, constrained decoding on the tiny model (real tokenizer, real xgrammar)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_image

from idefics_cli import structured as st
from idefics_cli.errors import ExitStatus, UsageError

QUESTION = "Extract the fields"

# Ten schemas: objects, nested, arrays, enums, numbers with bounds, required and optional fields, the concise
# syntax. Strings and numbers carry bounds: a random model left free in a string never closes it (that case
# is the truncation test).
SCHEMAS = [
    {"type": "object", "properties": {"vendor": {"type": "string", "maxLength": 12},
                                      "total": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["vendor", "total"]},
    {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"]}}, "required": ["address"]},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"enum": ["paid", "unpaid", "overdue"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}}, "required": ["n"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
     "required": ["b"]},
    {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["sku", "qty"], "properties": {
        "sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer", "minimum": 1, "maximum": 50}}}},
    {"anyOf": [{"type": "boolean"}, {"const": "unknown"}]},
    {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["ratio"]},
    "paid bool\nlate bool: is it overdue",
]


def answer(engine, schema, batch, max_new_tokens=80, constrained=True):
    """Greedy answers through model.generate, with the schema's logits processor; (texts, finish reasons)."""
    import torch

    inputs = engine.build_inputs(batch)
    extra = {"logits_processor": st.for_engine(engine, schema)} if constrained else {}
    with torch.inference_mode():
        out = engine.model.generate(**inputs, **extra, do_sample=False, max_new_tokens=max_new_tokens)
    stops = engine.eos_ids
    texts, reasons, all_ids = [], [], []
    for ids in out[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((k for k, t in enumerate(ids) if t in stops), None)
        ids = ids[: end + 1] if end is not None else ids
        texts.append(engine.processor.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True))
        reasons.append("stop" if end is not None else "length")
        all_ids.append(ids)
    return texts, reasons, all_ids


def parse(value) -> st.Schema:
    return st.parse_schema(value if isinstance(value, str) else json.dumps(value))


# ---- parsing ---------------------------------------------------------------------------------------------
def test_concise_syntax_matches_llm():
    s = parse("vendor, invoice_number, total float, due_date: ISO date, paid bool, n int")
    assert s.source == "concise"
    assert s.schema == {"type": "object", "properties": {
        "vendor": {"type": "string"}, "invoice_number": {"type": "string"}, "total": {"type": "number"},
        "due_date": {"type": "string", "description": "ISO date"}, "paid": {"type": "boolean"},
        "n": {"type": "integer"}}, "required": ["vendor", "invoice_number", "total", "due_date", "paid", "n"]}
    # newline-separated: commas then belong to descriptions
    lines = parse("vendor: the seller, as printed\ntotal float: amount due, with tax\n")
    assert lines.schema["properties"]["vendor"]["description"] == "the seller, as printed"
    assert lines.schema["required"] == ["vendor", "total"]


def test_file_inline_and_hash(tmp_path):
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    path = tmp_path / "invoice.schema.json"
    path.write_text(json.dumps(schema, indent=2))
    from_file, inline = st.parse_schema(str(path)), st.parse_schema(json.dumps(schema))
    assert (from_file.source, inline.source) == ("file", "json")
    assert from_file.schema == inline.schema == schema
    assert from_file.sha256 == inline.sha256 == st.schema_hash(dict(reversed(list(schema.items()))))
    assert parse("total float").sha256 == from_file.sha256  # the concise form of the same schema
    assert parse("total int").sha256 != from_file.sha256


def test_prompt_text():
    s = parse("total float")
    assert st.with_schema("What is due?", s) == ("What is due?\n\nAnswer with JSON only, valid against this JSON "
                                                 'Schema: {"type": "object", "properties": {"total": {"type": '
                                                 '"number"}}, "required": ["total"]}')


@pytest.mark.parametrize("value, named", [
    ('{"type": "object", "oneOf": [{"type": "object"}, {"required": ["a"]}]}', "'oneOf'"),
    ('{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}', "'uniqueItems'"),
    ('{"properties": {"a": {"not": {"type": "integer"}}}}', "'not' at /properties/a/not"),
    ('{"allOf": [{"type": "integer"}, {"minimum": 3}]}', "'allOf'"),
    ('{"type": "object", "dependentRequired": {"a": ["b"]}}', "'dependentRequired'"),
    ('{"type": "object", "requried": ["a"]}', "'requried'"),
    ('{"type": "string", "format": "credit-card"}', "'credit-card'"),
    ('{"type": "string", "pattern": "(?=a)b"}', "lookaround"),
    ('{"type": "objekt"}', "'type'"),
    ('{"type": "object", "required": "a"}', "'required'"),
    ('{"type": "object", "minProperties": 2}', "minProperties"),
    ('{"type": ', "not valid JSON"),
    ("total integer", "'integer'"),
    ("missing.schema.json", "no such schema file"),
    ("", "empty"),
    (", ,", "no fields"),
])
def test_bad_schemas_are_usage_errors(value, named):
    with pytest.raises(UsageError) as info:
        st.parse_schema(value)
    assert named in info.value.one_line()
    assert info.value.exit_status == ExitStatus.USAGE


def test_keyword_errors_do_not_import_torch(tmp_path):
    code = ("import sys\nfrom idefics_cli.structured import parse_schema\nfrom idefics_cli.errors import UsageError\n"
            "for value in sys.argv[1:]:\n    try:\n        parse_schema(value)\n"
            "    except UsageError as e:\n        print(e.one_line())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules))\n")
    values = ['{"properties": {"a": {"uniqueItems": true}}}', '{"type": "object", "oneOf": [{"type": "object"}]}',
              '{"requried": ["a"]}', "total integer", '{"type": 3}', "{nope", "schemas/missing"]
    out = subprocess.run([sys.executable, "-c", code, *values], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = out.stdout.splitlines()
    assert lines[0] == ("error [usage]: --schema: keyword 'uniqueItems' at /properties/a/uniqueItems is not "
                        "enforced by constrained decoding (the grammar engine cannot enforce it; remove it)")
    for line, named in zip(lines[1:], ["'oneOf'", "'requried'", "'integer'", "'type'", "not valid JSON",
                                       "no such schema file: schemas/missing"]):
        assert line.startswith("error [usage]: ") and named in line
    assert lines[len(values):] == ["[]"]


@pytest.mark.parametrize("schema, bad", [
    ({"type": "integer", "multipleOf": 5}, "7"), ({"type": "number", "exclusiveMinimum": 5}, "5"),
    ({"type": "string", "maxLength": 3}, '"abcd"'), ({"type": "string", "pattern": "^[0-9]+$"}, '"ab"'),
    ({"type": "string", "format": "date"}, '"soon"'), ({"type": "array", "maxItems": 1}, "[1, 2]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"b": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}"),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, '"s"'), ({"const": "x"}, '"y"'),
])
def test_allowed_keywords_are_enforced(engine, schema, bad):
    """The grammar refuses an instance that breaks the keyword (what ENFORCED promises)."""
    import xgrammar

    s = parse(schema)
    matcher = xgrammar.GrammarMatcher(st.compiled(s, engine.processor.tokenizer, 32003, [2, 32002]))
    assert not (matcher.accept_string(bad) and matcher.is_completed())


# ---- decoding on the tiny model ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", SCHEMAS, ids=[f"schema{k}" for k in range(len(SCHEMAS))])
def test_every_answer_parses_and_validates(engine, value):
    s = parse(value)
    texts, reasons, _ = answer(engine, s, [([make_image()], st.with_schema(QUESTION, s))])
    data, code = st.read_answer(texts[0], s, reasons[0])
    assert (code, reasons[0]) == (None, "stop"), texts[0]
    assert texts[0] == json.dumps(data, ensure_ascii=False)  # compact: ", " and ": ", no other whitespace


def test_unconstrained_answer_differs_and_is_not_json(engine):
    """The baseline the constraint is for: the same tiny model free gives no JSON at all."""
    s = parse(SCHEMAS[0])
    texts, _, _ = answer(engine, s, [([make_image()], st.with_schema(QUESTION, s))], constrained=False)
    with pytest.raises(json.JSONDecodeError):
        json.loads(texts[0])


def test_truncated_answer_gives_no_data(engine):
    s = parse("vendor, total float")  # an unbounded string: the random model does not close it in 12 tokens
    texts, reasons, ids = answer(engine, s, [([make_image()], st.with_schema(QUESTION, s))], max_new_tokens=12)
    assert reasons == ["length"] and len(ids[0]) == 12
    assert texts[0].startswith('{"vendor": "')
    assert st.read_answer(texts[0], s, reasons[0]) == (None, st.TRUNCATED)


def test_read_answer_codes():
    s = parse({"type": "object", "properties": {"due": {"type": "string", "format": "date"}}, "required": ["due"]})
    assert st.read_answer('{"due": "2024-02-28"}', s, "stop") == ({"due": "2024-02-28"}, None)
    assert st.read_answer('{"due": "2024-02-30"}', s, "stop") == (None, st.MISMATCH)  # the grammar lets it by
    assert st.read_answer('{"due": "2024-02-28"}', s, "length") == ({"due": "2024-02-28"}, None)  # ended in time
    assert st.read_answer('{"due": "2024-', s, "length") == (None, st.TRUNCATED)


@pytest.fixture(scope="module")
def sharp_engine(sharp_model):
    from idefics_cli.model import ModelOptions, load

    return load(ModelOptions(model=sharp_model, quant="none", device="cpu", max_new_tokens=8))


QUESTIONS = [QUESTION, "Read this invoice page and extract the fields, please", "Fields?"]


def test_batch_equals_single_rows(engine):
    """Left-padded constrained rows (questions of different lengths) = each row alone; the answers differ."""
    s = parse(SCHEMAS[0])
    rows = [([], st.with_schema(q, s)) for q in QUESTIONS]
    assert (engine.build_inputs(rows)["attention_mask"] == 0).any()  # really padded
    batched, reasons, _ = answer(engine, s, rows)
    singles = [answer(engine, s, [row])[0][0] for row in rows]
    assert batched == singles
    assert len(set(singles)) == 3  # different answers, so the comparison means something
    assert all(st.read_answer(t, s, r)[1] is None for t, r in zip(batched, reasons))


def test_same_tokens_as_xgrammars_own_processor(engine):
    """GrammarProcessor (batched matcher calls) picks what xgrammar.contrib.hf.LogitsProcessor picks."""
    import torch
    import xgrammar

    s = parse(SCHEMAS[0])  # three different answers of different lengths
    rows = [([], st.with_schema(q, s)) for q in QUESTIONS]
    inputs = engine.build_inputs(rows)
    grammar = st.compiled(s, engine.processor.tokenizer, 32003, engine.eos_ids)
    outs = []
    for processor in (st.GrammarProcessor(grammar), xgrammar.contrib.hf.LogitsProcessor(grammar)):
        with torch.inference_mode():
            outs.append(engine.model.generate(**inputs, logits_processor=[processor], do_sample=False,
                                              max_new_tokens=40))
    assert torch.equal(outs[0], outs[1])


def test_batch_of_pages_equals_single_pages(sharp_engine):
    """The same with a page image on every row (the sharp model, so the image counts)."""
    s = parse(SCHEMAS[6])
    rows = [([make_image(seed=k)], st.with_schema(q, s)) for k, q in enumerate(QUESTIONS)]
    assert (sharp_engine.build_inputs(rows)["attention_mask"] == 0).any()
    batched, reasons, _ = answer(sharp_engine, s, rows)
    assert batched == [answer(sharp_engine, s, [row])[0][0] for row in rows]
    assert all(st.read_answer(t, s, r)[1] is None for t, r in zip(batched, reasons))


# ---- a case where the free greedy answer already fits ---------------------------------------------------------
FITTED = '{"vendor": "ACME Tools", "total": 12.5, "paid": true}'
FITTED_SCHEMA = "vendor, total float, paid bool"


@pytest.fixture(scope="module")
def fitted_engine(tiny_model, tmp_path_factory):
    """The tiny model trained for a few steps to answer FITTED to one schema question (no image)."""
    import shutil

    import torch
    from transformers import Idefics2ForConditionalGeneration

    from idefics_cli.model import ModelOptions, load

    out = str(tmp_path_factory.mktemp("fitted-idefics2"))
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    probe = load(ModelOptions(model=tiny_model, quant="none", device="cpu", max_new_tokens=8))
    tok = probe.processor.tokenizer
    prompt = probe.build_inputs([([], st.with_schema(QUESTION, parse(FITTED_SCHEMA)))])["input_ids"]
    pieces = tok.tokenize(FITTED)
    pieces[0] = pieces[0].removeprefix("\u2581")  # the grammar allows no space before the JSON
    target = torch.tensor([[*tok.convert_tokens_to_ids(pieces), 32002]])
    ids = torch.cat([prompt, target], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, prompt.shape[1]:] = target
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return load(ModelOptions(model=out, quant="none", device="cpu", max_new_tokens=8))


@pytest.mark.parametrize("value", [FITTED_SCHEMA, {"type": "object", "properties": {
    "vendor": {"type": "string", "maxLength": 40}, "total": {"type": "number", "minimum": 0},
    "paid": {"type": "boolean"}, "note": {"type": "string"}}, "required": ["vendor", "total"]}])
def test_constrained_equals_free_answer_when_it_fits(fitted_engine, value):
    s = parse(value)
    row = [([], st.with_schema(QUESTION, parse(FITTED_SCHEMA)))]  # the question the model was fitted on
    free, free_reasons, free_ids = answer(fitted_engine, s, row, constrained=False)
    assert free == [FITTED] and free_reasons == ["stop"]  # the precondition: the free answer fits
    assert st.read_answer(free[0], s, "stop")[1] is None
    constrained, reasons, ids = answer(fitted_engine, s, row)
    assert (constrained, reasons, ids) == (free, free_reasons, free_ids)


def test_constrained_differs_when_the_free_answer_does_not_fit(fitted_engine):
    s = parse("vendor, total int, paid bool")  # 12.5 is no integer
    row = [([], st.with_schema(QUESTION, parse(FITTED_SCHEMA)))]
    constrained, reasons, _ = answer(fitted_engine, s, row)
    assert constrained[0] != FITTED
    data, code = st.read_answer(constrained[0], s, reasons[0])
    assert code is None and isinstance(data["total"], int), constrained[0]


@pytest.mark.parametrize("fmt", sorted(st.FORMATS))
def test_allowed_formats_are_enforced(engine, fmt):
    import xgrammar

    s = parse({"type": "string", "format": fmt})
    matcher = xgrammar.GrammarMatcher(st.compiled(s, engine.processor.tokenizer, 32003, [2, 32002]))
    assert not (matcher.accept_string('"soon!! x"') and matcher.is_completed())


def test_grammar_compiled_once_per_schema_and_tokenizer(engine):
    tokenizer = engine.processor.tokenizer
    first = st.compiled(parse("total float"), tokenizer, 32003, [2, 32002])
    assert st.compiled(parse('{"type": "object", "properties": {"total": {"type": "number"}}, "required": '
                             '["total"]}'), tokenizer, 32003, [32002, 2]) is first
    assert st.compiled(parse("total int"), tokenizer, 32003, [2, 32002]) is not first
