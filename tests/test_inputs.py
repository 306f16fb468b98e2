"""inputs.py: pixels built one row at a time equal one processor call over the whole batch."""

from __future__ import annotations

import pytest
from conftest import make_image

from idefics_cli import inputs


def one_call(tiny_model, batch, split):
    """The plain way: the processor over the whole batch at once, left-padded (as the model card batches)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model, do_image_splitting=split)
    processor.tokenizer.padding_side = "left"
    prompts = []
    for images, question in batch:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True))
    return processor(text=prompts, images=[images for images, _ in batch], padding=True, return_tensors="pt")


BATCHES = {
    "pages of different sizes": [([make_image(320, 240, 1)], "What is this?"),
                                 ([make_image(200, 500, 2)], "Read every word of the page, slowly."),
                                 ([make_image(700, 300, 3)], "Total?")],
    "rows with different image counts": [([make_image(300, 200, 4), make_image(150, 420, 5)], "Compare them."),
                                         ([make_image(260, 260, 6)], "Read it."),
                                         ([make_image(100, 90, 7), make_image(90, 100, 8), make_image(50, 60, 9)],
                                          "Which one is red?")],
    "a larger row last (the batch arrays grow)": [([make_image(60, 40, 10)], "a"),
                                                  ([make_image(90, 80, 11)], "b"),
                                                  ([make_image(640, 480, 12), make_image(30, 30, 13)], "c")],
}


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("name", list(BATCHES))
def test_row_by_row_equals_one_processor_call(engine, tiny_model, name, split):
    import torch

    batch = BATCHES[name]
    expected = one_call(tiny_model, batch, split)
    got = engine.build_inputs(batch, split=split)
    assert inputs.row_by_row(engine.processor)
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        # the pixel mask is kept as bool (the same 0/1 values in 1/8 of the memory; the model reads it as bool)
        dtype = torch.bool if key == "pixel_attention_mask" else expected[key].dtype
        assert got[key].dtype == dtype and got[key].shape == expected[key].shape, key
        assert torch.equal(got[key], expected[key].to(dtype)), key
    assert not got["pixel_attention_mask"].all()  # the premise: some padding had to be masked


def test_rows_without_images_stay_zero(engine):
    image = make_image(100, 80, 3)
    built = inputs.pixels(engine.processor.image_processor, [[], [image], []], False)
    values, mask = built["pixel_values"], built["pixel_attention_mask"]
    assert values.shape[:2] == (3, 1) and not values[0].any() and not values[2].any() and not mask[0].any()
    assert mask[1].any() and values[1].any()
    assert inputs.pixels(engine.processor.image_processor, [[], []], True) == {}


@pytest.mark.parametrize("split", [True, False])
def test_building_inputs_changes_no_shared_state(engine, tiny_model, split, monkeypatch):
    """Threads build inputs at once (prefetch, the no-split fallback): no call may change the processor or the
    tokenizer's settings, and a call's own split still decides its image tokens and pixels."""
    import torch

    image_processor = engine.processor.image_processor
    changed = []

    class Watched(type(image_processor)):
        def __setattr__(self, name, value):
            changed.append(name)
            super().__setattr__(name, value)

    monkeypatch.setattr(image_processor, "__class__", Watched)
    backend = engine.processor.tokenizer._tokenizer
    engine.build_inputs([([make_image(320, 240, 1)], "a"), ([make_image(200, 300, 2)], "b")])  # settles padding
    padding = backend.padding
    one, two = [([make_image(320, 240, 1)], "Read it.")], [([make_image(320, 240, 1)], "a"), ([make_image(9, 9)], "b")]
    for batch in (one, two, one):
        built = engine.build_inputs(batch, split=split)
        prepared = engine.prepare(batch, split=split, collect=True)
        expected = one_call(tiny_model, batch, split)
        assert torch.equal(built["input_ids"], expected["input_ids"]) and torch.equal(
            prepared["input_ids"], expected["input_ids"])
        assert torch.equal(built["pixel_values"], expected["pixel_values"])
        assert prepared["vision"].slots[0] == (5 if split else 1)  # crops built with the call's own split
        assert backend.padding == padding
    assert changed == [] and image_processor.do_image_splitting is engine.options.split
    assert not hasattr(engine, "_lock")
