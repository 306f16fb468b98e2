"""runtime/families.py: the family is the checkpoint's, and an Idefics3 (SmolVLM-shaped) model runs like the model card.

The reference is the model cards' code: `AutoProcessor` (its own splitting into 512-px tiles plus the global
image) and `AutoModelForImageTextToText.generate`, on the tiny Idefics3 of conftest.py, float32 on the CPU.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import make_image, make_pdf

QUESTION = "What is the total amount due?"
PAGES = [make_image(320, 240, seed=1), make_image(200, 400, seed=5)]  # landscape and portrait: different grids


def plain(model_dir, images, split, question=QUESTION, max_new_tokens=8):
    """The SmolVLM / Idefics3 model card's snippet: one processor call, one generate with pixel_values."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=split)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return inputs, new.tolist(), processor.decode(new, skip_special_tokens=True)


def built_pixels(vision) -> list:
    """The float pixels the vision tower gets from a prepared `VisionInputs` (8-bit images through the table)."""
    from idefics_cli.runtime.vision import _look_up

    return [(_look_up(vision.table, p) if p.dtype.name == "uint8" else p)
            for bucket in vision.buckets.values() for _, _, p in bucket]


@pytest.mark.parametrize("n", [1, 2], ids=["one page", "two pages"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
def test_ids_pixels_and_greedy_answer_equal_the_model_card(engine3, tiny_idefics3, split, n):
    import numpy as np

    images = PAGES[:n]
    reference, expected, _ = plain(tiny_idefics3, images, split)
    inputs = engine3.prepare([(images, QUESTION)], split=split)
    assert inputs["input_ids"].tolist() == reference["input_ids"].tolist()
    tiles = reference["pixel_values"][0].numpy()
    got = built_pixels(inputs["vision"])
    assert len(got) == len(tiles) == (n if not split else len(got)) and (split or len(got) == n)
    assert all(any(g.shape == t.shape and np.array_equal(g, t) for t in tiles) for g in got)
    assert engine3.generate(inputs).token_ids == expected
    usage = engine3.usage(inputs)
    assert usage["image_tokens"] == 64 * len(tiles)


def test_the_model_looks_at_the_pixels(engine3):
    """Without this, the identities above could hold for a model that ignores images."""
    answers = {tuple(engine3.generate(engine3.prepare([([page], QUESTION)], split=False)).token_ids)
               for page in [*PAGES, make_image(300, 300, seed=9)]}
    assert len(answers) >= 2


def test_batched_rows_of_different_grids_equal_each_page_alone(engine3):
    batch = [([page], "Transcribe.") for page in PAGES]
    together = engine3.generate_batch(engine3.prepare(batch, collect=True))
    alone = [engine3.generate(engine3.prepare([row])) for row in batch]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_context_is_checked_on_the_real_grids(engine3):
    from idefics_cli.errors import UsageError

    assert engine3.check_context(2, QUESTION, 8) < 300  # one tile an image at least: never refuses what fits
    with pytest.raises(UsageError, match="context of 8192"):
        engine3.prepare([([make_image(300, 300, seed=k) for k in range(8)], QUESTION)])  # 8 x 17 tiles


def test_ask_cli_json_says_family_and_quantization(cli, tiny_idefics3, tmp_path):
    path = tmp_path / "page.png"
    PAGES[0].save(path)
    _, _, expected = plain(tiny_idefics3, [PAGES[0]], False, max_new_tokens=6)
    result = cli("ask", path, QUESTION, "--json", "--model", tiny_idefics3, "--no-split", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["answer"] == expected and answer["usage"]["image_tokens"] == 64
    model = answer["model"]
    assert model["family"] == "idefics3" and model["quantization"] == "none"
    assert model["quantization_reason"].startswith("auto: 0.0") and "below 4B" in model["quantization_reason"]


def test_transcribe_batches_and_resumes(cli, engine3, tiny_idefics3, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    out = tmp_path / "out.jsonl"
    args = ["transcribe", pdf, "--out", out, "--model", tiny_idefics3, "--no-split", "--max-new-tokens", "6",
            "--batch-size", "2", "--dpi", "72"]
    assert cli(*args).exit_code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"] and all(r["usage"]["image_tokens"] == 64 for r in records)
    again = cli(*args)
    assert again.exit_code == 0 and len(out.read_text().splitlines()) == 2  # resumed: nothing redone


def test_chat_keeps_the_pages_in_the_conversation(engine3, tmp_path):
    from idefics_cli.tasks.conversation import ChatSession

    path = tmp_path / "page.png"
    PAGES[1].save(path)
    chat = ChatSession.open(str(path)).start(engine3)
    first = chat.ask(QUESTION)
    first_text = first.text
    second = chat.ask("And the date?")
    assert second.text is not None and second.usage["image_tokens"] == first.usage["image_tokens"] > 64
    assert first_text == engine3.generate(engine3.prepare([([PAGES[1]], QUESTION)])).text


def test_schema_constrains_an_idefics3_answer(engine3, tmp_path):
    from idefics_cli.structured import as_schema
    from idefics_cli.tasks.selection import ask, open_selection

    path = tmp_path / "page.png"
    PAGES[0].save(path)
    response = ask(engine3, open_selection([str(path)]), "The total?", 40, schema=as_schema("total float"))
    _ = response.text
    assert response.schema_error is not None or isinstance(response.data, dict)
    assert response.text.startswith("{")


def test_crops_shows_the_processors_tiles(cli, tiny_idefics3, tmp_path):
    path = tmp_path / "page.png"
    PAGES[0].save(path)
    result = cli("crops", path, "--model", tiny_idefics3, "--out", tmp_path / "sheet.png", "--dir", tmp_path / "d")
    assert result.exit_code == 0, result.stderr
    names = sorted(os.listdir(tmp_path / "d"))
    assert len(names) == 13 and any(n.endswith("-whole.png") for n in names)  # 3 x 4 tiles + the global image


def test_doctor_estimates_with_the_familys_numbers(cli, tiny_idefics3):
    result = cli("doctor", "--model", tiny_idefics3, "--json", "--device", "cpu")
    report = json.loads(result.stdout)
    estimate = report["estimate"]
    assert estimate["image_tokens_per_image"] == 64 and estimate["images_per_page"] == 13
    assert report["setup"]["quantization"] == "none" and "below 4B" in report["setup"]["quantization_reason"]


def test_python_api_runs_idefics3(tiny_idefics3, tmp_path):
    import idefics_cli

    path = tmp_path / "page.png"
    PAGES[0].save(path)
    engine = idefics_cli.load(tiny_idefics3, device="cpu", split=False, max_new_tokens=5)
    answer = engine.ask([str(path)], QUESTION)
    assert answer.text == plain(tiny_idefics3, [PAGES[0]], False, max_new_tokens=5)[2]


def _folder(tmp_path, model_type: str) -> str:
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"not weights: loading them would fail another way")
    return str(folder)


def test_another_architecture_is_a_model_error_before_the_weights(cli, tmp_path):
    page = tmp_path / "p.png"
    make_image().save(page)
    result = cli("ask", page, "What?", "--model", _folder(tmp_path, "llava"))
    assert result.exit_code == 5
    assert result.stderr.count("\n") == 1 and "error [model_error]" in result.stderr
    assert "is a llava model" in result.stderr and "Idefics2, Idefics3" in result.stderr


def test_a_config_that_is_no_object_is_a_model_error_not_a_crash(cli, tmp_path):
    page = tmp_path / "p.png"
    make_image().save(page)
    folder = _folder(tmp_path, "idefics2")
    for config in ([], {"model_type": "idefics2", "quantization_config": "bnb"}):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        result = cli("ask", page, "What?", "--model", folder)
        assert result.exit_code == 5 and result.stderr.count("\n") == 1, (config, result.stderr)
        assert result.stderr.startswith("error [model_error]: ") and "not a JSON object" in result.stderr


def test_smolvlm2_says_what_to_install(cli, tmp_path):
    from idefics_cli.runtime.families import SMOLVLM, _importable

    missing = [pip for module, pip in SMOLVLM.needs if not _importable(module)]
    if not missing:
        pytest.skip("num2words and torchvision both load here")
    page = tmp_path / "p.png"
    make_image().save(page)
    result = cli("ask", page, "What?", "--model", _folder(tmp_path, "smolvlm"))
    assert result.exit_code == 5 and f"pip install {' '.join(missing)}" in result.stderr


def test_server_answers_equal_ask_and_reuse_the_prefix(cli, tiny_idefics3, tmp_path):
    """`idefics serve` on the tiny Idefics3 with splitting: the answer of `ask --json` (two pages of different
    grids), the cached image prefix on the next question, and a `response_format` answer that parses."""
    from test_serve import Server, data_url

    srv = Server(tiny_idefics3, "--split")  # FLAGS' --no-split first: --split wins
    try:
        paths = []
        for k, page in enumerate(PAGES):
            paths.append(tmp_path / f"p{k}.png")
            page.save(paths[-1])
        ref = cli("ask", *paths, QUESTION, "--json", "--model", tiny_idefics3, "--quant", "none", "--max-new-tokens",
                  "8", "--split")
        assert ref.exit_code == 0, ref.stderr
        ref = json.loads(ref.stdout)
        client = srv.wait_ready().client(None)
        content = [{"type": "image_url", "image_url": {"url": data_url(page)}} for page in PAGES]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
        done = client.chat.completions.create(model="m", messages=messages)
        assert done.choices[0].message.content == ref["answer"]
        assert done.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
        again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            *content, {"type": "text", "text": "And the date?"}]}])
        assert again.usage.prompt_tokens_details.cached_tokens > ref["usage"]["image_tokens"]
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        shaped = client.chat.completions.create(model="m", messages=messages, max_tokens=20, response_format={
            "type": "json_schema", "json_schema": {"name": "f", "strict": True, "schema": schema}})
        assert isinstance(json.loads(shaped.choices[0].message.content)["ok"], bool)
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


def test_pdf_pages_render_at_the_processors_full_size(engine3, tiny_idefics3, tiny_model, tmp_path):
    from idefics_cli.interface import ModelOptions
    from idefics_cli.runtime.families import render_side
    from idefics_cli.tasks.selection import open_selection

    assert render_side(ModelOptions(model=tiny_idefics3)) == engine3.render_side == 2048  # SmolVLM's longest_edge
    assert render_side(ModelOptions(model=tiny_model)) is None  # Idefics2: the documents' 1960 px (2 x 980)
    pdf = make_pdf(tmp_path / "a.pdf", n_pages=1)
    page = open_selection([pdf], longest_side=render_side(ModelOptions(model=tiny_idefics3))).pages[0].image
    assert max(page.size) == 2048


DOCTAGS = ("<doctag><title><loc_10><loc_10><loc_200><loc_30>Quarterly report</title>"
           "<text><loc_10><loc_40><loc_400><loc_60>Revenue grew 12%.</text>"
           "<section_header_level_1><loc_10><loc_70><loc_300><loc_80>Totals</section_header_level_1>"
           "<text><loc_10><loc_90><loc_300><loc_100>Total: $1,234.50</text></doctag>")


def test_doctags_become_markdown():
    pytest.importorskip("docling_core")
    from idefics_cli.tasks.records import to_markdown

    assert to_markdown(DOCTAGS) == "# Quarterly report\n\nRevenue grew 12%.\n\n## Totals\n\nTotal: $1,234.50"


@pytest.fixture(scope="module")
def docling_model(tmp_path_factory) -> str:
    from idefics_cli.dev.tiny import build

    return build(str(tmp_path_factory.mktemp("tiny-smoldocling")), family="smoldocling")


def test_a_document_model_transcribes_to_doctags_and_markdown(cli, docling_model, tmp_path, monkeypatch):
    import sys

    from idefics_cli.interface import DOCLING_PROMPT, ModelOptions
    from idefics_cli.runtime.families import doctags
    from idefics_cli.tasks.records import docling_available as available
    from idefics_cli.tasks.transcription import TranscribeRequest

    assert doctags(ModelOptions(model=docling_model)) and not doctags(ModelOptions(model=str(tmp_path)))
    assert TranscribeRequest(("x",), doctags=True).prompt == DOCLING_PROMPT
    path = tmp_path / "page.png"
    PAGES[0].save(path)
    args = ["transcribe", path, "--model", docling_model, "--no-split", "--max-new-tokens", "12"]
    texts = []
    if available():  # the [docling] extra: records carry Markdown
        result = cli(*args, "--out", tmp_path / "with")
        assert result.exit_code == 0, result.stderr
        (record,) = [json.loads(line) for line in (tmp_path / "with" / "records.jsonl").read_text().splitlines()]
        assert record["status"] == "ok" and isinstance(record["markdown"], str) and record["text"]
        texts.append(record["text"])
    monkeypatch.setitem(sys.modules, "docling_core", None)  # as without the [docling] extra
    result = cli(*args, "--out", tmp_path / "without")
    assert result.exit_code == 0 and "pip install 'idefics-cli[docling]'" in result.stderr
    (bare,) = [json.loads(line) for line in (tmp_path / "without" / "records.jsonl").read_text().splitlines()]
    assert "markdown" not in bare and bare["status"] == "ok" and bare["text"] and texts in ([], [bare["text"]])
    assert bare["text"].strip() in (tmp_path / "without" / "page.md").read_text()


def test_quantize_an_idefics3_and_ask_it(cli, tiny_idefics3, tmp_path):
    """`quantize` saves nf4 whatever the size (auto would not quantize it); the copy loads as nf4 and answers."""
    out = tmp_path / "nf4"
    result = cli("quantize", out, "--model", tiny_idefics3, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    page = tmp_path / "p.png"
    PAGES[0].save(page)
    answer = cli("ask", page, QUESTION, "--json", "--model", out, "--no-split", "--max-new-tokens", "4")
    assert answer.exit_code == 0, answer.stderr
    model = json.loads(answer.stdout)["model"]
    assert model["quantization"] == "nf4" and model["quantization_reason"] == "the checkpoint is saved in nf4"


def test_the_tiny_idefics3_carries_smolvlms_tokens_and_template(engine3):
    processor = engine3.processor
    tok = processor.tokenizer
    assert engine3.prompt(1, "What?") == "<|im_start|>User:<image>What?<end_of_utterance>\nAssistant:"
    assert engine3.prompt(0, "Hi") == "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"
    ids = tok.convert_tokens_to_ids
    assert [ids(t) for t in ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                             "<row_1_col_1>", "<row_6_col_6>", "<|im_start|>", "<|im_end|>")] == [
        32000, 32001, 32002, 32003, 32004, 32039, 32040, 32041]
    assert tok("<|im_start|>User:").input_ids[0] == 32040  # the template's bos; none added on top
    assert processor.image_seq_len == 64 and engine3.eos_ids == {32002}
    assert processor.image_processor.size["longest_edge"] == 2048
    assert processor.image_processor.max_image_size["longest_edge"] == 512
