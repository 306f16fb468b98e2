"""runtime/decode.py: the one decode loop on the sharpened tiny Idefics2 (float32, CPU).

Each row's answer in a loop where rows join and leave is the answer it gets alone; per-row state (stop strings,
UTF-8 holdback, grammar, cancel, failures) stays with its row."""

from __future__ import annotations

import json

import pytest
from conftest import make_image

from idefics_cli.runtime.decode import Loop, Row, run_rows, stream

QUESTIONS = ["What is this?", "Read the page.", "Who sent it?", "What is the total?", "Describe it."]


@pytest.fixture(scope="module")
def prompts(sharp_engine):
    """(ids, features) of five one-page prompts, features encoded once (rows copy nothing they are given)."""
    out = []
    for k, question in enumerate(QUESTIONS):
        (row,) = sharp_engine.rows(sharp_engine.prepare([([make_image(seed=k)], question)]))
        out.append((row.ids, row.features))
    return out


def _row(prompt, **kw) -> Row:
    ids, features = prompt
    kw.setdefault("max_tokens", 8)
    return Row(ids, features, **kw)


def _alone(engine, prompt, **kw) -> Row:
    row = _row(prompt, **kw)
    list(run_rows(Loop(engine), [row], 1))
    return row


def test_rows_join_and_leave_between_steps_with_their_solo_answers(sharp_engine, prompts):
    limits = [3, 12, 5, 9, 2]
    solo = [_alone(sharp_engine, p, max_tokens=n).token_ids for p, n in zip(prompts, limits)]
    loop = Loop(sharp_engine)
    rows = [_row(p, max_tokens=n, tag=k) for k, (p, n) in enumerate(zip(prompts, limits))]
    widths, order = [], []
    step = loop.step

    def watched():
        widths.append(len(loop.rows))
        return step()

    loop.step = watched
    for row in run_rows(loop, rows, 2):
        order.append(row.tag)
    assert [row.token_ids for row in rows] == solo
    assert [len(t) for t in solo] == limits and all(row.finish_reason == "length" for row in rows)
    # a row that ends hands its place on at once: two rows a step until none is left to join, then the last one
    assert widths == sorted(widths, reverse=True) and set(widths) == {1, 2} and widths.count(2) >= sum(limits) // 2 - 3
    assert order == [0, 2, 1, 4, 3]  # rows leave as they end, not in the order they came


def test_a_stop_string_across_tokens_cuts_the_answer_and_is_never_streamed(sharp_engine, prompts):
    full = _alone(sharp_engine, prompts[1], max_tokens=12)
    pieces = [sharp_engine.decode(full.token_ids[:k]) for k in range(1, len(full.token_ids) + 1)]
    k = next(k for k in range(1, len(pieces)) if len(pieces[k - 1]) >= 2 and len(pieces[k]) > len(pieces[k - 1]))
    cut = len(pieces[k - 1]) - 1
    stop = pieces[k][cut:cut + 2]  # the last character of one token and the first of the next
    assert len(stop) == 2
    row = _row(prompts[1], max_tokens=12, stop=[stop])
    streamed = list(stream(Loop(sharp_engine), row))
    assert row.finish_reason == "stop" and row.text == full.text[:full.text.find(stop)]
    assert "".join(streamed) == row.text and all(stop not in p for p in streamed)
    ends = row.token_ends()  # the tokens that wrote the stop string (and those after it) write nothing
    assert len(ends) == len(row.logprobs) == len(row.token_ids) and ends == sorted(ends) and ends[-1] == len(row.text)


def test_a_stop_string_longer_than_the_text_so_far_streams_nothing_past_the_stop():
    """The holdback of a long stop string never slices from the end (a text shorter than it streams nothing)."""
    pieces = {1: '="$', 2: " Craft", 3: " Craft"}
    row = Row([0], max_tokens=12, stop=["Craft Craft"])
    streamed = []
    row.on_text = streamed.append
    for token in (1, 2, 3):
        row._accept(token, set(), lambda ids: "".join(pieces[i] for i in ids))
    assert row.finish_reason == "stop" and row.text == '="$ '
    assert "".join(streamed) == row.text


def test_a_vanishing_temperature_samples_the_greedy_answer_and_keeps_the_loop_alive(sharp_engine, prompts):
    """A temperature too small for float32 (serve accepts 0..2) is greedy's limit, with finite log-probabilities;
    a row whose sampling fails fails alone (it used to raise out of `Loop.add`, ending serve's worker thread)."""
    import math

    greedy = _alone(sharp_engine, prompts[0], max_tokens=6, top_n=2)
    for temperature in (1e-45, 5e-324):
        row = _alone(sharp_engine, prompts[0], max_tokens=6, temperature=temperature, seed=1, top_n=2)
        assert row.finish_reason == "length" and row.token_ids == greedy.token_ids
        assert all(math.isfinite(v) for v in row.logprobs)
    loop = Loop(sharp_engine)
    broken, fine = _row(prompts[0], temperature=float("nan")), _row(prompts[1], max_tokens=3)
    ended = loop.add([broken, fine])
    assert broken in ended and broken.finish_reason == "error" and fine in loop.rows


def _forcing(ids: list[int]):
    """A logits processor that makes a row write `ids`, one a step."""

    def force(input_ids, scores):

        done = len(input_ids[0]) - force.prompt
        scores[:] = float("-inf")
        scores[0, ids[min(done, len(ids) - 1)]] = 0.0
        return scores

    return force


def test_an_unfinished_character_is_held_back(sharp_engine, prompts):
    tokenizer = sharp_engine.processor.tokenizer
    euro = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode()]
    assert len(euro) == 3 and all(isinstance(t, int) and t > 2 for t in euro)
    force = _forcing(euro * 2)
    row = _row(prompts[0], max_tokens=6, processors=[force])
    force.prompt = len(row.ids)
    streamed = list(stream(Loop(sharp_engine), row))
    assert row.token_ids == euro * 2 and row.text == "€€"
    assert streamed == ["€", "€"]  # never a replacement character for the first two bytes
    assert row.token_ends() == [0, 0, 1, 1, 1, 2]  # a character is written by the token that completes it
    assert row.logprobs == [0.0] * 6  # the processor left one token: probability 1


def test_each_row_keeps_its_own_grammar(sharp_engine, prompts):
    from idefics_cli.structured import as_schema, row_grammar

    schemas = [as_schema("paid bool"), as_schema({"type": "object", "properties": {"n": {"enum": [1, 2, 3]}},
                                                  "required": ["n"], "additionalProperties": False}), None]
    rows = [_row(p, max_tokens=40, grammar=row_grammar(sharp_engine, s) if s else None, tag=s)
            for p, s in zip(prompts, schemas)]
    list(run_rows(Loop(sharp_engine), rows, 3))
    paid, number = json.loads(rows[0].text), json.loads(rows[1].text)
    assert set(paid) == {"paid"} and isinstance(paid["paid"], bool)
    assert number["n"] in (1, 2, 3)
    assert rows[2].token_ids == _alone(sharp_engine, prompts[2], max_tokens=40).token_ids  # unconstrained


def test_a_cancelled_row_and_a_failing_row_leave_their_neighbours_alone(sharp_engine, prompts):
    solo = [_alone(sharp_engine, p, max_tokens=10).token_ids for p in prompts[:4]]
    calls = []

    def breaks(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a processor that fails")
        return scores

    rows = [_row(p, max_tokens=10) for p in prompts[:3]] + [_row(prompts[3], max_tokens=10, processors=[breaks])]
    seen = []

    def cancel_after_two(piece, row=rows[1]):
        seen.append(piece)
        if len(seen) == 2:
            row.cancel()

    rows[1].on_text = cancel_after_two
    list(run_rows(Loop(sharp_engine), rows, 4))
    assert [r.finish_reason for r in rows] == ["length", "cancelled", "length", "error"]
    assert rows[3].error.code == "generation_error" and len(rows[3].token_ids) == 2
    assert rows[1].token_ids == solo[1][:len(rows[1].token_ids)] and len(rows[1].token_ids) < 10
    assert rows[0].token_ids == solo[0] and rows[2].token_ids == solo[2]


def test_a_row_that_ends_on_its_first_token_never_joins(sharp_engine, prompts):
    eos = next(iter(sharp_engine.eos_ids))
    force = _forcing([eos])
    row = _row(prompts[0], processors=[force])
    force.prompt = len(row.ids)
    loop = Loop(sharp_engine)
    assert loop.add([row]) == [row] and not loop.rows
    assert row.finish_reason == "stop" and row.text == "" and row.token_ids == [eos]
