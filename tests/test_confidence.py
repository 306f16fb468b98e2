"""tasks/confidence.py and the decode loop's log-probabilities: confidence, field confidence, --min-confidence.

The loop's values are checked against a separate forward pass of the tiny model (transformers' own forward over
prompt + answer, float32): the probability of each chosen token, greedy and sampled. The JSON scanner and the
token-to-field mapping are checked on hand-made token spans; one `--schema` answer end to end.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_image, make_pdf

from idefics_cli import Model
from idefics_cli.tasks import confidence as c


# ---- the scanner and the mapping, by hand -----------------------------------------------------------------
def test_spans_give_each_leaf_its_literal_in_nested_objects_and_arrays():
    text = '{"a": "x\\"y", "b": [1, {"c": null}], "d": -2.5e3, "e": [], "f": {}}'
    spans = c.spans(text)
    assert spans == {"a": (6, 12), "b": [(20, 21), {"c": (29, 33)}], "d": (42, 48), "e": [], "f": {}}
    assert [text[a:b] for a, b in (spans["a"], spans["b"][0], spans["b"][1]["c"], spans["d"])] == [
        '"x\\"y"', "1", "null", "-2.5e3"]
    assert c.spans(' [true, "\\u00e9"] ') == [(2, 6), (8, 16)]
    assert c.spans('{"k\\n": 1}') == {"k\n": (8, 9)}
    for bad in ('{"a": 1', "[1, 2", '{"a" 1}', "nope", "[1] 2", ""):
        assert c.spans(bad) is None, bad


def test_each_leaf_gets_the_lowest_probability_of_the_tokens_that_wrote_it():
    #        {"vendor": "Acme", "items": [{"qty": 2}, {"qty": 10}]}
    text = '{"vendor": "Acme", "items": [{"qty": 2}, {"qty": 10}]}'
    pieces = ['{"', 'vendor', '":', ' "', 'Ac', 'me', '",', ' "items": [{"qty": ', '2', '},', ' {"qty": ', '1', '0',
              '}]}', '']  # the last: the end token, which writes nothing
    assert "".join(pieces) == text
    probs = [0.99, 0.9, 0.98, 0.97, 0.5, 0.8, 0.7, 0.95, 0.6, 0.96, 0.94, 0.3, 0.4, 0.93, 0.2]
    ends, at = [], 0
    for piece in pieces:
        at += len(piece)
        ends.append(at)
    logprobs = [math.log(p) for p in probs]
    got = c.fields(text, logprobs, ends)
    # "Acme" with its quotes: ' "' (0.97), 'Ac' (0.5), 'me' (0.8), '",' (0.7); 2: '2' alone; 10: '1' and '0'
    assert got == {"vendor": 0.5, "items": [{"qty": 0.6}, {"qty": 0.3}]}
    assert c.lowest(got) == 0.3 and c.lowest({"a": [], "b": {}}) is None
    assert c.summary(logprobs, ends) == {"mean_logprob": round(sum(logprobs) / len(logprobs), 6), "min_prob": 0.2,
                                         "min_at": len(text)}
    assert c.summary([], []) is None and c.fields(text, [], []) is None
    # a token that ends inside a character writes nothing; it counts for the character the next one completes
    assert c.fields('"é"', [math.log(0.9), math.log(0.4), math.log(0.8), math.log(0.7)], [1, 1, 2, 3]) == 0.4


# ---- the decode loop's values against a separate forward pass ---------------------------------------------
def forward_logprobs(engine, inputs, tokens: list[int], temperature: float = 1.0) -> list[float]:
    """log P(token) at each answer position from one forward pass of the model over prompt + answer."""
    import torch

    prompt = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    ids = torch.cat([prompt, torch.tensor(tokens[:-1], dtype=prompt.dtype)])[None]
    pixels = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask") if k in inputs}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels).logits[0].float()
    logits = logits[len(prompt) - 1:]
    logits[:, engine.suppressed_ids] = float("-inf")
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def page():
    return [([make_image(seed=2)], "What is the total?")]


def test_greedy_confidence_is_the_forward_pass_probability_of_each_token(engine, page):
    gen = engine.generate(engine.prepare(page), 8)
    assert len(gen.logprobs) == len(gen.token_ids) == len(gen.ends) == 8
    want = forward_logprobs(engine, engine.build_inputs(page), gen.token_ids)
    assert gen.logprobs == pytest.approx(want, abs=1e-4)
    low = min(range(8), key=want.__getitem__)
    summary = c.summary(gen.logprobs, gen.ends)
    assert summary["mean_logprob"] == pytest.approx(sum(want) / 8, abs=1e-4)
    assert summary["min_prob"] == pytest.approx(math.exp(want[low]), abs=1e-4)
    assert summary["min_at"] == (gen.ends[low - 1] if low else 0) and gen.ends[-1] == len(gen.text)


def test_a_sampled_row_scores_tokens_at_its_temperature(engine, page):
    from idefics_cli.runtime.decode import Loop, run_rows

    (row,) = engine.rows(engine.prepare(page), 8)
    row.temperature, row.top_p, row.seed = 0.7, 0.9, 3
    list(run_rows(Loop(engine), [row], 1))
    want = forward_logprobs(engine, engine.build_inputs(page), row.token_ids, temperature=0.7)
    assert row.logprobs == pytest.approx(want, abs=1e-4)


# ---- end to end: --schema, field_confidence, --min-confidence -----------------------------------------------
NESTED = {"type": "object", "required": ["paid", "items", "note"], "properties": {
    "paid": {"type": "boolean"},
    "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "object", "required": ["qty", "ok"],
        "properties": {"qty": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}}}},
    "note": {"enum": ["a", "b"]}}}


def test_field_confidence_mirrors_nested_data_with_each_fields_lowest_token(engine, tmp_path):
    page = tmp_path / "page.png"
    make_image(seed=6).save(page)
    response = Model(engine).ask(str(page), "Fill it in.", schema=NESTED, max_new_tokens=64)
    answer = response.to_dict()
    gen = response._generation
    data, fields = answer["data"], answer["field_confidence"]
    assert set(data) == set(fields) == {"paid", "items", "note"} and len(fields["items"]) == 2
    assert all(set(item) == {"qty", "ok"} for item in fields["items"])
    # brute force: every token that overlaps a leaf's literal, however the tokens fall
    spans, starts = c.spans(answer["answer"]), [0, *gen.ends[:-1]]

    def lowest(span):
        hits = [lp for s, e, lp in zip(starts, gen.ends, gen.logprobs) if s < span[1] and max(e, s + 1) > span[0]]
        return round(math.exp(min(hits)), 6)

    assert fields == {"paid": lowest(spans["paid"]), "note": lowest(spans["note"]),
                      "items": [{k: lowest(v) for k, v in item.items()} for item in spans["items"]]}
    assert answer["confidence"]["min_prob"] <= c.lowest(fields) <= 1
    assert list(answer)[list(answer).index("data") + 1] == "field_confidence"


def test_min_confidence_marks_pages_under_it_by_their_lowest_field_or_token():
    from types import SimpleNamespace

    from idefics_cli.interface import Generation
    from idefics_cli.structured import as_schema
    from idefics_cli.tasks.records import ok_record

    task = SimpleNamespace(input=SimpleNamespace(path="a.pdf"), page=1, pages=1, sha256="", warnings=[])
    text = '{"n": 12}'  # '{"n": ' 0.9, '1' 0.6, '2' 0.8, '}' 0.95, the end token 0.4
    gen = Generation(text=text, finish_reason="stop", logprobs=[math.log(p) for p in (0.9, 0.6, 0.8, 0.95, 0.4)],
                     ends=[6, 7, 8, 9, 9])
    schema = as_schema("n int")

    def warned(bound, schema=schema, gen=gen):
        record = ok_record(task, gen, 0.0, "s", schema=schema, min_confidence=bound)
        assert record.status == "ok" or schema is not None
        return "low_confidence" in record.warnings

    assert ok_record(task, gen, 0.0, "s", schema=schema).field_confidence == {"n": 0.6}
    assert [warned(b) for b in (0.5, 0.6, 0.61, None)] == [False, False, True, False]  # the field's 0.6
    assert [warned(b, None) for b in (0.4, 0.41)] == [False, True]  # no schema: the lowest token, the end's 0.4
    assert not warned(0.99, gen=Generation(text='{"n": 1', finish_reason="length", logprobs=[-1.0], ends=[7]))


def test_min_confidence_warns_low_pages_keeps_them_ok_and_counts_them(engine, tmp_path, cli, tiny_model):
    doc = make_pdf(tmp_path / "two.pdf", 2)
    run = Model(engine).transcribe(doc, schema="paid bool", min_confidence=0.999999)
    records = list(run)
    assert all(r.status == "ok" and r.warnings == ["low_confidence"] for r in records)
    assert all(c.lowest(r.field_confidence) < 0.999999 for r in records) and run.summary.low_confidence == 2
    # the CLI: the warning in the records, the count in the summary; without a schema, the lowest token
    out = tmp_path / "plain.jsonl"
    res = cli("transcribe", doc, "--out", out, "--min-confidence", "1", "--model", tiny_model, "--quant", "none",
              "--device", "cpu", "--max-new-tokens", "8")
    assert res.exit_code == 0, res.stderr
    plain = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["warnings"] == ["low_confidence"] and r["confidence"]["min_prob"] < 1 for r in plain)
    assert "2 pages transcribed (2 low confidence)" in res.stderr
    res = cli("transcribe", doc, "--min-confidence", "1.5", "--model", tiny_model)
    assert res.exit_code == 2 and "--min-confidence" in res.stderr


def test_data_that_is_null_has_null_field_confidence_in_answers_and_records(engine, tmp_path):
    """formats.md: `field_confidence` is null when `data` is, in `ask`'s answer and a page's record alike; the
    page's lowest field is then its lowest token (--min-confidence)."""
    page = tmp_path / "page.png"
    make_image(seed=3).save(page)
    schema = {"type": "null"}
    answer = Model(engine).ask(str(page), "Anything?", schema=schema).to_dict()
    records = list(Model(engine).transcribe([str(page)], schema=schema, min_confidence=1))
    assert answer["answer"] == "null" and answer["data"] is None and "error" not in answer
    assert [(r.status, r.data, r.field_confidence) for r in records] == [("ok", None, None)]
    assert answer["field_confidence"] is None
    assert records[0].warnings == ["low_confidence"] and records[0].confidence["min_prob"] < 1
