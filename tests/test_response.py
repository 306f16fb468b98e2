"""tasks/selection.py's Response, the streaming answer of `Model.ask`, on the tiny model (real processor, generate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_image

from idefics_cli import Model

QUESTION = "What is the total amount due?"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("response") / "page.png"
    make_image(420, 300, seed=7).save(path)
    return str(path)


def test_iterating_streams_pieces_once_and_then_knows_the_answer(engine, page):
    answer = Model(engine).ask([page], QUESTION)
    assert not answer.done and answer.received == ""
    pieces = list(answer)
    assert len(pieces) > 1 and answer.done
    assert list(answer) == []  # iterating again gives nothing new
    assert answer.text == "".join(pieces) and answer.finish_reason == "length"
    assert answer.usage == {"prompt_tokens": answer.usage["prompt_tokens"], "image_tokens": 320,
                            "completion_tokens": 8}
    assert list(answer) == [] and answer.text == "".join(pieces)


def test_text_before_iterating_reads_the_whole_answer(engine, page):
    streamed = "".join(Model(engine).ask([page], QUESTION))
    answer = Model(engine).ask([page], QUESTION)
    assert answer.text == streamed  # the first access consumed the stream
    assert answer.done and list(answer) == []
    assert answer.usage["completion_tokens"] == 8 and answer.finish_reason == "length"


def test_a_break_leaves_the_rest_for_the_next_read(engine, page):
    answer = Model(engine).ask([page], QUESTION)
    first = next(iter(answer))  # the loop's iterator is dropped, as after a `break`
    assert answer.received == first and not answer.done
    rest = list(answer)
    assert rest and first + "".join(rest) == answer.text  # nothing repeated, nothing lost


def test_close_stops_generating_and_keeps_what_was_read(engine, page):
    answer = Model(engine).ask([page], QUESTION, max_new_tokens=200)
    first = next(iter(answer))
    answer.close()
    assert answer.interrupted and answer.done and answer.text == first and answer.finish_reason is None
    assert answer.usage["completion_tokens"] is None and list(answer) == []


def test_a_schema_answer_closed_early_is_interrupted_not_a_schema_error(engine, page):
    """The user stopped it: no data and no error, as without a schema (not `schema_mismatch`)."""
    answer = Model(engine).ask([page], QUESTION, schema="vendor, total float", max_new_tokens=200)
    first = next(iter(answer))
    answer.close()
    out = answer.to_dict()
    assert answer.interrupted and answer.text == first and answer.schema_error is None
    assert out["data"] is None and out["finish_reason"] is None and "error" not in out


def test_to_dict_equals_ask_json(engine, page, cli, tiny_model):
    """The library's answer object is what `idefics ask --json` prints for the same input (timing aside)."""
    result = cli("ask", page, QUESTION, "--json", "--model", tiny_model, "--quant", "none", "--device", "cpu",
                 "--max-new-tokens", "8")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    mine = Model(engine).ask([page], QUESTION).to_dict()
    assert list(mine) == list(printed)
    assert set(mine.pop("timing")) == set(printed.pop("timing"))
    assert mine == printed


def test_library_answer_equals_the_model_card_code(engine, tiny_model, page):
    from test_ask import plain_answer

    expected, _ = plain_answer(tiny_model, page, QUESTION, True, 12)
    assert Model(engine).ask(page, QUESTION, max_new_tokens=12).text == expected


def test_logits_processor_reaches_generate_streamed_and_batched(engine, page):
    """A processor that allows one token only: the answer is that token, so the hook really ran."""
    import torch

    token = engine.processor.tokenizer.convert_tokens_to_ids("▁yes")

    def only_yes(input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0
        return forced

    answer = Model(engine).ask([page], QUESTION, max_new_tokens=3, logits_processor=[only_yes])
    assert answer.text == "yes yes yes"
    batch = engine.prepare([([make_image(seed=1)], "Hi?"), ([make_image(seed=2)], "Read it.")])
    assert [g.text for g in engine.generate_batch(batch, 2, logits_processor=[only_yes])] == ["yes yes"] * 2


def test_a_selection_opened_ahead_is_asked_without_reopening(engine, page):
    import idefics_cli
    from idefics_cli.errors import UsageError

    selection = idefics_cli.open_pages([page, page])
    answer = Model(engine).ask(selection, QUESTION)
    assert answer.usage["image_tokens"] == 640 and [s.pages for s in answer.sources] == [[1, 1]]
    assert answer.to_dict()["sources"] == [{"path": page, "pages": [1, 1]}]
    with pytest.raises(UsageError, match="open_pages"):
        Model(engine).ask(selection, QUESTION, pages="1")
    with pytest.raises(UsageError, match="empty"):
        Model(engine).ask(selection, "  ")


def test_importing_the_library_imports_no_torch():
    code = "import sys, idefics_cli\nprint([m for m in ('torch', 'transformers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr[-500:]



@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": -1}, {"max_new_tokens": 32769},
                                 {"max_new_tokens": True}, {"max_new_tokens": "8"}, {"dpi": 5}, {"dpi": 1201}])
def test_bad_bounds_are_refused_as_the_flags_refuse_them(engine, page, tmp_path, bad):
    """What the CLI's flags bound (--max-new-tokens 1-32768, --dpi 10-1200) the library bounds too: in `ask`,
    `chat`, `transcribe`, `open_pages`, `load` and `connect`, a UsageError before any work."""
    import idefics_cli
    from idefics_cli.errors import UsageError
    from idefics_cli.interface import ModelOptions
    from idefics_cli.tasks.pipeline import TranscribeRequest

    model = Model(engine)
    (name, value), = bad.items()
    calls = [lambda: model.ask(page, QUESTION, **bad)]
    if name == "dpi":
        calls += [lambda: model.transcribe([page], tmp_path / "out", dpi=value),
                  lambda: idefics_cli.open_pages(page, dpi=value), lambda: model.chat(page, dpi=value)]
    else:
        chat = model.chat(page)
        calls += [lambda: TranscribeRequest([page], None, ModelOptions(max_new_tokens=value)),
                  lambda: chat.ask(QUESTION, **bad), lambda: idefics_cli.load("/no/such/model", **bad),
                  lambda: idefics_cli.connect("http://127.0.0.1:9", **bad)]
    for call in calls:
        with pytest.raises(UsageError, match=name):
            call()
    assert not (tmp_path / "out").exists()


def test_a_question_must_be_a_non_empty_string_in_ask_and_in_chat(engine, page, tmp_path):
    from idefics_cli.errors import UsageError

    model = Model(engine)
    chat = model.chat(page)
    for question, why in (("", "empty"), ("  \n", "empty"), (None, "string"), (7, "string")):
        with pytest.raises(UsageError, match=why):
            model.ask(page, question)
        with pytest.raises(UsageError, match=why):
            chat.ask(question)
    assert chat.save(tmp_path / "chat.json") == 0  # nothing was added to the conversation
    chat.close()


def test_transcribe_takes_a_path_object_for_out(engine, page, tmp_path):
    run = Model(engine).transcribe([page], tmp_path / "out")
    assert [r.status for r in run] == ["ok"] and run.exit_status == 0
    with open(tmp_path / "out" / "records.jsonl") as f:
        assert [json.loads(line)["page"] for line in f] == [1]


@pytest.mark.parametrize("bad", [None, 5, "file", "image", "array", [None], [3], "a\0b.pdf"])
def test_what_is_not_a_document_path_is_a_usage_error_in_every_entry_point(engine, page, tmp_path, bad):
    """A document is given by its path (str, bytes, os.PathLike): None, a number, an open file, a PIL image or an
    array is one UsageError in `ask`, `open_pages`, `chat` and `transcribe`, not a TypeError from deep inside."""
    import numpy as np
    from PIL import Image

    import idefics_cli
    from idefics_cli.errors import UsageError

    model = Model(engine)
    with open(page, "rb") as file, Image.open(page) as image:
        value = {"file": file, "image": image, "array": np.zeros((4, 4, 3), np.uint8)}.get(bad, bad) \
            if isinstance(bad, str) else bad
        for call in (lambda: model.ask(value, QUESTION), lambda: idefics_cli.open_pages(value),
                     lambda: model.chat(value), lambda: model.transcribe(value, tmp_path / "out")):
            with pytest.raises(UsageError, match="path"):
                call()
    assert not (tmp_path / "out").exists()


def test_wrong_types_for_outputs_model_and_server_are_usage_errors(engine, page):
    import idefics_cli
    from idefics_cli.errors import UsageError

    model = Model(engine)
    chat = model.chat(page)
    calls = [lambda: chat.save(None), lambda: chat.save(5), lambda: model.transcribe([page], 5),
             lambda: model.transcribe([page], prompt=5), lambda: idefics_cli.load(None), lambda: idefics_cli.load(5),
             lambda: idefics_cli.connect(5), lambda: idefics_cli.connect("http://127.0.0.1:9", api_key=5)]
    calls += [lambda: model.ask(page, QUESTION, password=5), lambda: idefics_cli.open_pages(page, password=b"x"),
              lambda: model.chat(page, password=5), lambda: model.transcribe([page], password=5),
              lambda: model.transcribe([page], force="no"), lambda: model.transcribe([page], temperature=0.5),
              lambda: model.transcribe([page], options=None), lambda: model.transcribe([page], max_new_tokens=4)]
    calls += [lambda kw=kw: idefics_cli.load("/no/such/model", **kw)  # "no" is truthy: split would stay on
              for kw in ({"split": "no"}, {"offline": 1}, {"tune_process": "yes"}, {"revision": 5})]
    for call in calls:
        with pytest.raises(UsageError):
            call()
    chat.close()
    assert model.ask(page, QUESTION).text  # the model still answers
