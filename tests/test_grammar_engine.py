"""grammar_engine.py: llguidance's view of the real idefics2 tokenizer, and masks applied in place.

Decoding through it is tests/test_structured.py (model.generate) and tests/test_serve_schema.py (the server).
"""

from __future__ import annotations

import json

import pytest

from idefics_cli import grammar_engine as ge

STOPS = [2, 32002]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_fast_view_gives_every_token_the_bytes_llguidances_own_view_gives(tokenizer):
    """The view read from sentencepiece pieces = llguidance.hf.from_tokenizer's (the slow route), token by token."""
    from llguidance.hf import from_tokenizer

    view = ge.tokenizer_view(tokenizer, 32003, STOPS)
    assert ge.tokenizer_view(tokenizer, 32003, list(reversed(STOPS))) is view  # once per process
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

    compiled = ge.Compiled.of({"enum": ["paid", "unpaid"]}, tokenizer, 32003, STOPS)
    rows = [ge.RowGrammar(compiled), None, ge.RowGrammar(compiled)]
    logits = torch.zeros(3, 32010)
    ge.mask_rows(logits, rows)
    allowed = torch.isfinite(logits)
    assert allowed[1].all() and not allowed[0, 32003:].any()
    assert torch.equal(allowed[0], allowed[2]) and 0 < int(allowed[0].sum()) < 100
    assert not allowed[0, STOPS].any()
    view = compiled.view
    for token in view.tokenize_str('"paid"'):
        rows[0].accept(token)
    logits.zero_()
    ge.mask_rows(logits, rows)
    assert torch.isfinite(logits[0, STOPS]).all() and not torch.isfinite(logits[2, STOPS]).any()
    rows[0].accept(32002)
    assert rows[0].done
    logits.zero_()
    ge.mask_rows(logits, rows)
    assert torch.isfinite(logits[:2]).all()  # a done row is left alone
    with pytest.raises(RuntimeError, match="outside the grammar"):
        rows[2].accept(view.tokenize_str("1")[-1])


def test_closed_adds_additional_properties_false_where_the_schema_says_nothing():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "object", "additionalProperties": True}},
              "$defs": {"d": {"properties": {"e": {}}}}, "anyOf": [{"patternProperties": {"^x": {}}}]}
    out = ge.closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy: the user's schema (and its hash) is left alone
    assert json.loads(ge.grammar_text(schema))  # the grammar is JSON text
