"""structured.py: schema parsing and checks, llguidance's view of the real idefics2 tokenizer, masks applied in place,
constrained decoding on the tiny model (real tokenizer and llguidance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_image

from idefics_cli import structured as st
from idefics_cli.errors import ExitStatus, UsageError
from idefics_cli.structured import RowGrammar, mask_rows

QUESTION = "Extract the fields"

# Ten schemas: objects, nested, arrays, enums, numbers with bounds, required and optional fields, the concise
# syntax. Strings and numbers carry bounds: a random model left free in a string never closes it (that case
# is the truncation test), nor stops adding digits to a number with a fraction (hence multipleOf, a power of two
# so that jsonschema's float division checks it exactly).
SCHEMAS = [
    {"type": "object", "properties": {"vendor": {"type": "string", "maxLength": 12},
                                      "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25}},
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


class GrammarProcessor:
    """A transformers logits processor for one generate call (the reference for the decode loop's grammar rows):
    one RowGrammar per row, all masked by one `mask_rows` call.

    Each row's grammar is fed its row's last token (the same whatever the padding on the left); a row that took
    a stop token is left alone.
    """

    def __init__(self, compiled):
        self.grammar = compiled
        self.rows: list[RowGrammar] | None = None

    def __call__(self, input_ids, scores):
        if self.rows is None:  # the first call comes after the prompt: nothing to accept yet
            self.rows = [RowGrammar(self.grammar) for _ in range(input_ids.shape[0])]
        else:
            if input_ids.shape[0] != len(self.rows):
                raise RuntimeError(f"GrammarProcessor made for {len(self.rows)} rows got {input_ids.shape[0]}")
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                row.accept(token)
        mask_rows(scores, self.rows)
        return scores


def for_engine(engine, schema) -> list:
    """The logits processors that constrain one `model.generate` call of `engine` to `schema`."""
    return [GrammarProcessor(st.compiled(schema, *st._engine_args(engine)))]


def answer(engine, schema, batch, max_new_tokens=80, constrained=True, processors=None):
    """Greedy answers through model.generate, with the schema's logits processor; (texts, reasons, token ids)."""
    import torch

    inputs = engine.build_inputs(batch)
    processors = processors or (for_engine(engine, schema) if constrained else None)
    extra = {"logits_processor": processors} if processors else {}
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


def test_a_schema_file_may_be_a_pipe_and_a_folder_is_named_as_one(tmp_path):
    """`--schema <(jq ...)`: the shell passes /dev/fd/N, a pipe that exists but is no regular file."""
    read, write = os.pipe()
    os.write(write, b'{"enum": ["paid", "unpaid"]}')
    os.close(write)
    try:
        schema = st.parse_schema(f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert schema.schema == {"enum": ["paid", "unpaid"]} and schema.source == "file"
    with pytest.raises(UsageError, match="is a folder"):
        st.parse_schema(f"{tmp_path}/")


def test_a_schema_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """UTF-8 with a BOM (what Windows Notepad saves) is UTF-8: read as without it."""
    path = tmp_path / "bom.schema.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"type": "string"}).encode())
    assert st.parse_schema(str(path)).schema == {"type": "string"}


def test_prompt_text():
    s = parse("total float")
    assert st.with_schema("What is due?", s) == ("What is due?\n\nAnswer with JSON only, valid against this JSON "
                                                 'Schema: {"type": "object", "properties": {"total": {"type": '
                                                 '"number"}}, "required": ["total"]}')


@pytest.mark.parametrize("value, named", [
    ('{"type": "object", "oneOf": [{"type": "object"}, {"required": ["a"]}]}', "'oneOf'"),
    ('{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}', "'uniqueItems'"),
    ('{"properties": {"a": {"not": {"type": "integer"}}}}', "'not' at /properties/a/not"),
    ('{"type": "array", "contains": {"const": 5}}', "'contains'"),
    ('{"type": "object", "dependentRequired": {"a": ["b"]}}', "'dependentRequired'"),
    ('{"type": "object", "propertyNames": {"maxLength": 3}}', "'propertyNames'"),
    ('{"type": "object", "unevaluatedProperties": false}', "'unevaluatedProperties'"),
    ('{"type": "object", "requried": ["a"]}', "'requried'"),
    ('{"type": "string", "format": "credit-card"}', "'credit-card'"),
    ('{"type": "string", "format": "uri-reference"}', "'uri-reference'"),
    ('{"type": "string", "pattern": "(?=a)b"}', "lookaround"),
    ('{"type": "objekt"}', "'type'"),
    ('{"type": "object", "required": "a"}', "'required'"),
    ('{"type": "integer", "minimum": 5, "maximum": 3}', "grammar: Unsatisfiable schema: minimum (5) is greater"),
    ('{"type": "string", "pattern": "[z-a]"}', "'pattern'"),
    ('{"properties": {"a": {}}, "minProperties": 2}', "min/maxProperties only supported when all keys"),
    ('{"allOf": [{"type": "integer"}, {"type": "string"}]}', "Unsatisfiable schema: incompatible types"),
    ('{"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, '
     '"required": ["a"]}}}', "--schema has no finite instance"),  # was a generation_error once the model ran
    ('{"type": ', "not valid JSON"),
    ('{"$schema": 5}', "'$schema' at /$schema"),
    ("total integer", "'integer'"),
    ("missing.schema.json", "no such schema file"),
    ("invoice.yaml", "no such schema file: invoice.yaml"),  # not a one-field schema named "invoice.yaml"
    ("", "empty"),
    (", ,", "no fields"),
])
def test_bad_schemas_are_usage_errors(value, named):
    with pytest.raises(UsageError) as info:
        st.parse_schema(value)
    assert named in info.value.one_line()
    assert info.value.exit_status == ExitStatus.USAGE


@pytest.mark.parametrize("value", ['{"type": "number", "minimum": NaN}', '{"type": "number", "maximum": Infinity}',
                                   '{"type": "number", "maximum": 1e400}', '{"enum": [-Infinity]}',
                                   {"type": "number", "minimum": float("nan")},
                                   {"type": "string", "default": {1, 2}}])
def test_a_schema_that_is_not_json_is_a_usage_error(value):
    """Python's json reads NaN and Infinity (and 1e400 as inf); a dict may hold anything: no JSON Schema."""
    with pytest.raises(UsageError) as info:
        st.as_schema(value)
    assert "not valid JSON" in info.value.one_line()


def nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("depth", [80, 100, 400, 3000])
def test_a_schema_nested_too_deeply_is_a_usage_error(depth):
    """Whichever of json, jsonschema or llguidance gives up first, the user gets a usage line, not a bug report."""
    text = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
    for value in (text, nested(depth)):
        with pytest.raises(UsageError) as info:
            st.as_schema(value)
        assert "deep" in info.value.one_line() or "recursion" in info.value.one_line(), info.value.one_line()


@pytest.mark.parametrize("value, named", [
    ({"type": "string", 1: 2}, "keyword '1'"),
    ({"type": "object", "properties": {"a": {"type": "string"}, 1: {"type": "string"}}}, None),
    ({"type": "string", None: 1}, "keyword 'null'"),
])
def test_a_dict_schema_is_taken_as_its_json(value, named):
    """A Python dict may have keys that are not strings: the schema is what its JSON says (keys as text)."""
    if named is None:
        assert st.as_schema(value).schema == json.loads(json.dumps(value))
        return
    with pytest.raises(UsageError, match=named):
        st.as_schema(value)


def test_schema_errors_do_not_import_torch(tmp_path):
    """Keyword and grammar errors alike: llguidance builds and checks the grammar without torch."""
    code = ("import sys\nfrom idefics_cli.structured import parse_schema\nfrom idefics_cli.errors import UsageError\n"
            "for value in sys.argv[1:]:\n    try:\n        parse_schema(value)\n"
            "    except UsageError as e:\n        print(e.one_line())\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    values = ['{"properties": {"a": {"uniqueItems": true}}}', '{"type": "object", "oneOf": [{"type": "object"}]}',
              '{"requried": ["a"]}', "total integer", '{"type": 3}', "{nope", "schemas/missing",
              '{"type": "string", "minLength": 5, "maxLength": 2}', "total float"]
    out = subprocess.run([sys.executable, "-c", code, *values], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = out.stdout.splitlines()
    assert lines[0] == ("error [usage]: --schema: keyword 'uniqueItems' at /properties/a/uniqueItems is not "
                        "enforced by constrained decoding (the grammar engine cannot enforce it; remove it)")
    for line, named in zip(lines[1:], ["'oneOf'", "'requried'", "'integer'", "'type'", "not valid JSON",
                                       "no such schema file: schemas/missing", "cannot be turned into a grammar: "
                                       "Unsatisfiable schema: minLength (5) is greater than maxLength (2)"]):
        assert line.startswith("error [usage]: ") and named in line
    assert lines[len(values) - 1:] == ["[]"]  # the last value is fine: no line of its own


def _instance(compiled, text: str) -> bool:
    """Whether a fresh matcher of `compiled` takes `text` (as the tokenizer splits it) as a complete value."""
    matcher = compiled.matcher()
    return matcher.consume_tokens(compiled.view.tokenize_str(text)) and matcher.is_accepting()


@pytest.fixture
def grammar_of(engine):
    """schema -> its Compiled grammar for the idefics2 tokenizer (width 32003, stops 2 and 32002)."""
    return lambda schema: st.compiled(parse(schema), engine.processor.tokenizer, 32003, [2, 32002])


KEYWORD_CASES = [  # (schema, an instance that keeps the keyword, one that breaks it)
    ({"type": "integer"}, "3", '"3"'), ({"enum": ["a", "b"]}, '"b"', '"c"'), ({"const": "x"}, '"x"', '"y"'),
    ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"}, "1", "true"),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"s"'),
    ({"$defs": {"t": {"type": "object", "properties": {"v": {"type": "string"}, "kids": {"type": "array", "items": {
        "$ref": "#/$defs/t"}}}, "required": ["v"]}}, "$ref": "#/$defs/t"},  # recursion that can stop: kept
     '{"v": "a", "kids": [{"v": "b"}]}', '{"kids": []}'),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "4", "2"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": 1}', '{"a": "x"}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, "{}", '{"b": 1}'),  # closed by default
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"b": 1}', '{"b": "x"}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a": 1}', "{}"),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, '{"x1": 1}', '{"y": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1}, '{"a": 1}',
     '{"a": 1, "b": 2}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1}, '{"a": 1}', "{}"),
    ({"type": "array", "items": {"type": "integer"}}, "[1, 2]", '[1, "a"]'),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1]", '["a"]'),
    ({"type": "array", "minItems": 2}, "[1, 2]", "[1]"), ({"type": "array", "maxItems": 1}, "[1]", "[1, 2]"),
    ({"type": "integer", "minimum": 3}, "3", "2"), ({"type": "integer", "maximum": 3}, "3", "4"),
    ({"type": "number", "exclusiveMinimum": 5}, "5.5", "5"), ({"type": "number", "exclusiveMaximum": 5}, "4", "5"),
    ({"type": "integer", "multipleOf": 5}, "10", "7"), ({"type": "number", "multipleOf": 0.5}, "1.5", "1.2"),
    ({"type": "string", "minLength": 3}, '"abc"', '"ab"'), ({"type": "string", "maxLength": 3}, '"abc"', '"abcd"'),
    ({"type": "string", "pattern": "^[0-9]+$"}, '"12"', '"ab"'),
    ({"type": "array", "items": {"type": "integer"}}, "[1, 2]", "[1,2]"),  # compact: ", " and ": " only
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": 1}', '{"a":1}'),
    ({"type": "integer"}, "3", " 3"),
]


def test_allowed_keywords_are_enforced(grammar_of):
    """The grammar takes an instance that keeps each keyword and refuses one that breaks it (ENFORCED's promise);
    every enforced keyword has its case."""
    for schema, good, bad in KEYWORD_CASES:
        compiled = grammar_of(schema)
        assert _instance(compiled, good) and not _instance(compiled, bad), (schema, good, bad)
    covered = {key for schema, _, _ in KEYWORD_CASES for key in schema}
    assert st.ENFORCED - covered == {"definitions", "format"}  # format: the next test; definitions: $defs' alias


FORMAT_GOOD = {"date": '"2024-02-28"', "time": '"10:00:00Z"', "date-time": '"2024-02-28T10:00:00Z"',
               "duration": '"P1D"', "email": '"a@b.co"', "uri": '"http://a.b/c"',
               "uuid": '"123e4567-e89b-12d3-a456-426614174000"', "ipv4": '"1.2.3.4"', "ipv6": '"::1"',
               "hostname": '"a.b"'}


def test_allowed_formats_are_enforced(grammar_of):
    assert set(FORMAT_GOOD) == st.FORMATS
    for fmt, good in FORMAT_GOOD.items():
        compiled = grammar_of({"type": "string", "format": fmt})
        assert _instance(compiled, good) and not _instance(compiled, '"soon!! x"'), fmt


# ---- decoding on the tiny model ------------------------------------------------------------------------------
class PerRowSchemas:
    """A logits processor for a batch whose rows have different schemas: a RowGrammar each, one mask_rows call."""

    def __init__(self, engine, schemas):
        self.rows = [schema and st.row_grammar(engine, schema) for schema in schemas]
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                if row is not None:
                    row.accept(token)
        self.started = True
        st.mask_rows(scores, self.rows)
        return scores


def test_every_answer_parses_and_validates(engine):
    """The ten schemas, one row each in one batch (no image: the schema is in the question): every answer is
    compact JSON that validates."""
    schemas = [parse(value) for value in SCHEMAS]
    rows = [([], st.with_schema(QUESTION, s)) for s in schemas]
    texts, reasons, _ = answer(engine, None, rows, processors=[PerRowSchemas(engine, schemas)])
    for s, text, reason in zip(schemas, texts, reasons):
        data, code = st.read_answer(text, s, reason)
        assert (code, reason) == (None, "stop"), text
        assert text == json.dumps(data, ensure_ascii=False)  # compact: ", " and ": ", no other whitespace


def test_unconstrained_answer_differs_and_is_not_json(engine):
    """The baseline the constraint is for: the same tiny model free gives no JSON at all."""
    s = parse(SCHEMAS[0])
    texts, _, _ = answer(engine, s, [([], st.with_schema(QUESTION, s))], constrained=False, max_new_tokens=16)
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
    from idefics_cli.runtime.model import ModelOptions, load_engine

    return load_engine(ModelOptions(model=sharp_model, quant="none", device="cpu", max_new_tokens=8, split=False))


QUESTIONS = [QUESTION, "Read this invoice page and extract the fields, please", "Fields?"]


class Recorder:
    """Wraps a GrammarProcessor: keeps, per step, which logits were finite before it and after it."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __call__(self, input_ids, scores):
        import torch

        before = torch.isfinite(scores)
        out = self.inner(input_ids, scores)
        self.steps.append((before, torch.isfinite(out)))
        return out


def test_batch_equals_single_rows_and_masks_equal_a_fresh_matchers(engine):
    """Left-padded constrained rows (questions of different lengths) = each row alone; the answers differ. At
    every step of the batch, each row's mask is what a fresh llguidance matcher fed that row's tokens gives."""
    import llguidance
    import numpy as np

    s = parse(SCHEMAS[0])
    rows = [([], st.with_schema(q, s)) for q in QUESTIONS]
    assert (engine.build_inputs(rows)["attention_mask"] == 0).any()  # really padded
    compiled = st.compiled(s, *st._engine_args(engine))
    recorder = Recorder(GrammarProcessor(compiled))
    batched, reasons, ids = answer(engine, s, rows, processors=[recorder])
    singles = [answer(engine, s, [row])[0][0] for row in rows]
    assert batched == singles
    assert len(set(singles)) == 3  # different answers, so the comparison means something
    assert all(st.read_answer(t, s, r)[1] is None for t, r in zip(batched, reasons))
    for k, row_ids in enumerate(ids):
        matcher = llguidance.LLMatcher(compiled.view, compiled.grammar, log_level=0)
        for step, token in enumerate(row_ids):
            before, after = (m[k] for m in recorder.steps[step])
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = bits[:32003].astype(bool)
            assert np.array_equal(after.numpy(), before.numpy() & allowed), (k, step)
            assert allowed[[2, 32002]].all() == (step == len(row_ids) - 1)  # stops: exactly when the JSON is done
            assert matcher.consume_token(token)


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
FITTED_ROW = [([], "Fields?")]  # a short prompt: cheaper training steps (the schema's text plays no part here)


@pytest.fixture(scope="module")
def fitted_engine(tiny_model):
    """The tiny model trained for a few steps to answer FITTED to a short question (no image): its decoder layers
    only (the embeddings and the output head, 8 of its 9 M weights, stay as they are: cheaper steps), in place
    in a loaded Engine of its own. 30 steps leave each greedy choice ahead of the next by more than 1 logit."""
    import torch

    from idefics_cli.runtime.model import ModelOptions, start_load

    options = ModelOptions(model=tiny_model, quant="none", device="cpu", max_new_tokens=8)
    engine = start_load(options, cpu_kernels=False).finish()  # trainable: no prepacked copies of the weights
    tok = engine.processor.tokenizer
    prompt = engine.build_inputs(FITTED_ROW)["input_ids"]
    pieces = tok.tokenize(FITTED)
    pieces[0] = pieces[0].removeprefix("\u2581")  # the grammar allows no space before the JSON
    target = torch.tensor([[*tok.convert_tokens_to_ids(pieces), 32002]])
    ids = torch.cat([prompt, target], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, prompt.shape[1]:] = target
    torch.manual_seed(0)
    model = engine.model
    for name, param in model.named_parameters():
        param.requires_grad_("text_model.layers" in name or "text_model.norm" in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    with torch.enable_grad():
        for _ in range(30):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return engine


@pytest.mark.parametrize("value", [FITTED_SCHEMA, {"type": "object", "properties": {
    "vendor": {"type": "string", "maxLength": 40}, "total": {"type": "number", "minimum": 0},
    "paid": {"type": "boolean"}, "note": {"type": "string"}}, "required": ["vendor", "total"]}])
def test_constrained_equals_free_answer_when_it_fits(fitted_engine, value):
    s = parse(value)
    row = FITTED_ROW  # the question the model was fitted on
    free, free_reasons, free_ids = answer(fitted_engine, s, row, constrained=False)
    assert free == [FITTED] and free_reasons == ["stop"]  # the precondition: the free answer fits
    assert st.read_answer(free[0], s, "stop")[1] is None
    constrained, reasons, ids = answer(fitted_engine, s, row)
    assert (constrained, reasons, ids) == (free, free_reasons, free_ids)


def test_constrained_differs_when_the_free_answer_does_not_fit(fitted_engine):
    s = parse("vendor, total int, paid bool")  # 12.5 is no integer
    row = FITTED_ROW
    constrained, reasons, _ = answer(fitted_engine, s, row)
    assert constrained[0] != FITTED
    data, code = st.read_answer(constrained[0], s, reasons[0])
    assert code is None and isinstance(data["total"], int), constrained[0]


def test_grammar_compiled_once_per_schema_and_tokenizer(engine):
    tokenizer = engine.processor.tokenizer
    first = st.compiled(parse("total float"), tokenizer, 32003, [2, 32002])
    assert st.compiled(parse('{"type": "object", "properties": {"total": {"type": "number"}}, "required": '
                             '["total"]}'), tokenizer, 32003, [32002, 2]) is first
    assert st.compiled(parse("total int"), tokenizer, 32003, [2, 32002]) is not first


STOPS = [2, 32002]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_fast_view_gives_every_token_the_bytes_llguidances_own_view_gives(tokenizer):
    """The view read from sentencepiece pieces = llguidance.hf.from_tokenizer's (the slow route), token by token."""
    from llguidance.hf import from_tokenizer

    view = st.tokenizer_view(tokenizer, 32003, STOPS)
    assert st.tokenizer_view(tokenizer, 32003, list(reversed(STOPS))) is view  # once per process
    reference = from_tokenizer(tokenizer, n_vocab=32003, eos_token=STOPS)
    assert (view.vocab_size, view.eos_tokens) == (reference.vocab_size, reference.eos_tokens) == (32003, STOPS)
    ids = list(range(32003))
    assert [view.decode_bytes([i]) for i in ids] == [reference.decode_bytes([i]) for i in ids]
    assert [view.is_special_token(i) for i in ids] == [reference.is_special_token(i) for i in ids]
    assert view.is_special_token(32002) and view.decode_bytes([28705, 28740]) == b" 1"
    for text in ['{"vendor": "ACME", "total": 12.5}', "é€😀 x", "\n\n{"]:
        assert view.tokenize_str(text) == reference.tokenize_str(text)


def test_mask_rows_masks_only_rows_with_a_grammar(tokenizer):
    """Rows without a grammar (None) or done are left alone; columns past the grammar's vocabulary are blocked;
    stop tokens are allowed exactly when the value is complete."""
    import torch

    compiled = st.Compiled.of({"enum": ["paid", "unpaid"]}, tokenizer, 32003, STOPS)
    rows = [st.RowGrammar(compiled), None, st.RowGrammar(compiled)]
    logits = torch.zeros(3, 32010)
    st.mask_rows(logits, rows)
    allowed = torch.isfinite(logits)
    assert allowed[1].all() and not allowed[0, 32003:].any()
    assert torch.equal(allowed[0], allowed[2]) and 0 < int(allowed[0].sum()) < 100
    assert not allowed[0, STOPS].any()
    view = compiled.view
    for token in view.tokenize_str('"paid"'):
        rows[0].accept(token)
    logits.zero_()
    st.mask_rows(logits, rows)
    assert torch.isfinite(logits[0, STOPS]).all() and not torch.isfinite(logits[2, STOPS]).any()
    rows[0].accept(32002)
    assert rows[0].done
    logits.zero_()
    st.mask_rows(logits, rows)
    assert torch.isfinite(logits[:2]).all()  # a done row is left alone
    with pytest.raises(RuntimeError, match="outside the grammar"):
        rows[2].accept(view.tokenize_str("1")[-1])


def test_closed_adds_additional_properties_false_where_the_schema_says_nothing():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "object", "additionalProperties": True}},
              "$defs": {"d": {"properties": {"e": {}}}}, "anyOf": [{"patternProperties": {"^x": {}}}]}
    out = st.closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy: the user's schema (and its hash) is left alone
    assert json.loads(st.grammar(schema))  # the grammar is JSON text
    tuple_ = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
              "items": [{"type": "object", "properties": {"a": {"type": "string"}}}]}  # draft-07's tuple form
    assert st.closed(tuple_)["items"][0]["additionalProperties"] is False
