"""vision.py: chunked, same-shape image encoding gives the plain model-card answer, with bounded pixels.

The reference is the model card's code: one processor call over all the images (which pads them to a common
size and sends a pixel mask) and one `generate` with `pixel_values`. Everything runs on the CPU in float32.
"""

from __future__ import annotations

import pytest
from conftest import make_image, until_eos

QUESTION = "What is the total amount due?"
CASES = {
    "one page": [("form", 420, 300, 7)],
    "same-shape pages": [("form", 420, 300, 1), ("noise", 420, 300, 2), ("dark", 420, 300, 3)],
    "mixed-shape pages": [("dark", 320, 240, 1), ("form", 200, 400, 2), ("noise", 300, 300, 3), ("red", 520, 260, 4)],
}


def picture(kind: str, width: int, height: int, seed: int):
    """Pages that look different enough for the sharpened model to answer them differently."""
    import numpy as np
    from PIL import Image, ImageDraw

    if kind == "form":
        return make_image(width, height, seed)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = Image.new("RGB", (width, height), (0, 0, 0) if kind == "dark" else (230, 20, 20))
    draw = ImageDraw.Draw(image)
    draw.text((20, 20), f"Total: {seed * 42}", fill="white")
    draw.rectangle([40, 40, width // 2, height // 2], fill=(20, 20, 230))
    return image


@pytest.fixture(scope="module")
def engines(tiny_model, sharp_model):
    from idefics_cli.runtime.model import ModelOptions, load_engine

    loaded = {}
    for name, folder in (("tiny", tiny_model), ("sharp", sharp_model)):
        for split in (True, False):
            loaded[name, split] = load_engine(ModelOptions(model=folder, quant="none", device="cpu", split=split))
    return loaded


def plain(model_dir, model, images, split, max_new_tokens=10):
    """The model card's snippet: one processor call, one generate with pixel_values."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=split)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs, out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
@pytest.mark.parametrize("which", ["tiny", "sharp"])
def test_chunked_answer_equals_the_model_card_path(engines, tiny_model, sharp_model, which, split, case):
    engine = engines[which, split]
    images = [picture(*spec) for spec in CASES[case]]
    reference, expected = plain(tiny_model if which == "tiny" else sharp_model, engine.model, images, split)
    if case == "mixed-shape pages":
        assert not reference["pixel_attention_mask"].all()  # the premise: the plain path pads
    for chunk in (1, 3, None):  # one image a call, chunks that cut across pages, the automatic size
        engine.vision_chunk = chunk
        try:
            inputs = engine.prepare([(images, QUESTION)])
            assert "pixel_values" not in inputs and "vision" in inputs
            assert inputs["input_ids"].tolist() == reference["input_ids"].tolist()
            gen = engine.generate(inputs, max_new_tokens=10)
        finally:
            engine.vision_chunk = None
        assert gen.token_ids == expected, (which, split, case, chunk)


def test_the_sharpened_model_looks_at_the_pixels(engines, sharp_model):
    """Without this, the identity above could hold for a model that ignores images."""
    engine = engines["sharp", True]
    pages = [picture(*spec) for spec in CASES["mixed-shape pages"]]
    answers = {tuple(plain(sharp_model, engine.model, [page], True)[1]) for page in pages}
    assert len(answers) >= 3


def test_batched_rows_equal_the_plain_batch(engines):
    """A transcribe batch (one page a row, mixed shapes): the same greedy ids as the padded processor batch."""
    engine = engines["sharp", True]
    batch = [([picture(*spec)], "Transcribe.") for spec in CASES["mixed-shape pages"]]
    import torch

    with torch.inference_mode():  # the model card's path: one padded processor batch through generate
        plain_batch = engine.build_inputs(batch)
        out = engine.model.generate(**plain_batch, do_sample=False, max_new_tokens=6)
    new = out[:, plain_batch["input_ids"].shape[1]:].tolist()
    expected = [until_eos(ids, engine.eos_ids) for ids in new]
    prepared = engine.prepare(batch, collect=True)
    assert prepared["vision"].next == len(batch)  # every pixel built ahead (the prefetch thread's work)
    assert [g.token_ids for g in engine.generate_batch(prepared, max_new_tokens=6)] == expected


def test_pixels_are_unpadded_grouped_by_shape_and_bounded(engines, monkeypatch):
    """Each vision call gets <= chunk images of one shape, no mask; at most chunk + one page's images wait."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Model

    from idefics_cli.runtime import vision

    engine = engines["tiny", True]
    calls, waiting = [], []
    real_features, real_build = Idefics2Model.get_image_features, vision.VisionInputs.build_one

    def features(self, pixel_values, pixel_attention_mask=None, **kwargs):
        calls.append((tuple(pixel_values.shape), pixel_attention_mask))
        return real_features(self, pixel_values, pixel_attention_mask, **kwargs)

    def build_one(self, image_processor):
        real_build(self, image_processor)
        waiting.append(self.pending)

    monkeypatch.setattr(Idefics2Model, "get_image_features", features)
    monkeypatch.setattr(vision.VisionInputs, "build_one", build_one)
    monkeypatch.setattr(vision._Repeats, "_kept", vision.weakref.WeakKeyDictionary())  # no repeats from before
    pages = [make_image(*((420, 300) if k % 2 else (300, 420)), seed=k) for k in range(8)]
    distinct = {(p.shape, p.tobytes()) for page in pages
                for p in vision._own_size_pixels(engine.processor.image_processor, page, True)}
    engine.vision_chunk = 4
    try:
        engine.generate(engine.prepare([(pages, QUESTION)]), max_new_tokens=1)
    finally:
        engine.vision_chunk = None
    assert len(waiting) == 8 and max(waiting) <= 4 + 5 - 1  # built page by page, flushed at the chunk size
    assert sum(shape[0] for shape, _ in calls) == len(distinct) and all(shape[0] <= 4 for shape, _ in calls)
    assert all(mask is None and shape[1] == 1 for shape, mask in calls)
    # one shape per call, and it is the images' own: the processor's pixels of one page, trimmed by its mask
    shapes = {shape[-2:] for shape, _ in calls}
    own = set()
    for page in pages:
        out = engine.processor.image_processor([[page]], do_image_splitting=True)
        for mask in out["pixel_attention_mask"][0]:
            own.add((int(mask.any(1).sum()), int(mask.any(0).sum())))
    assert shapes == own


def test_auto_chunk(engines, monkeypatch):
    from idefics_cli.runtime.vision import CHUNK_ENV, auto_chunk

    engine = engines["tiny", True]
    assert 1 <= auto_chunk(engine.model, "cpu") <= 16
    monkeypatch.setenv(CHUNK_ENV, "3")
    assert auto_chunk(engine.model, "cpu") == 3


def odd_modes():
    """Pages in the other modes PIL opens scans in: grey, 1-bit, palette, alpha, CMYK, 16-bit and float grey."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    base = make_image(640, 830, 6)
    grey16 = Image.fromarray(rng.integers(0, 65536, (300, 200), dtype=np.uint16))
    return [base.convert("L"), base.convert("1"), base.convert("P"), base.convert("RGBA"), base.convert("CMYK"),
            base.convert("LA"), grey16, Image.fromarray(rng.random((200, 300), dtype=np.float32)),
            Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8))]


def test_the_value_table_is_the_processors_own_arithmetic(engines):
    """Idefics2's processor maps each 8-bit value on its own: its table is what it makes of a ramp of all 256."""
    import numpy as np
    from PIL import Image

    from idefics_cli.runtime.vision import value_table

    image_processor = engines["tiny", True].processor.image_processor
    table = value_table(image_processor)
    assert table is not None and table.shape == (3, 256) and table.dtype == np.float32
    assert value_table(image_processor) is table  # asked once per processor
    value = np.full((7, 9, 3), 200, dtype=np.uint8)
    whole = image_processor([[Image.fromarray(value)]], do_image_splitting=False, do_resize=False, do_pad=False)
    assert np.array_equal(whole["pixel_values"][0][0], np.broadcast_to(table[:, 200, None, None], (3, 7, 9)))
    assert table[0, 0] == -1.0 and table[0, 255] == 1.0  # idefics2-8b: rescale 1/255, mean 0.5, std 0.5


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
def test_unpadded_pixels_equal_the_padded_call_trimmed(engines, split):
    """Unpadded pixels through the value table are, value for value, the padded processor call's images cut back to
    their masks, for every image mode."""
    import numpy as np

    from idefics_cli.runtime.vision import _own_size_pixels

    image_processor = engines["tiny", split].processor.image_processor
    for page in (make_image(1515, 1960, 1), make_image(1961, 1517, 2), make_image(301, 37, 3), make_image(5, 5, 4),
                 *odd_modes()):
        own = _own_size_pixels(image_processor, page, split)
        out = image_processor([[page]], do_image_splitting=split)
        values, mask = out["pixel_values"][0], out["pixel_attention_mask"][0]
        assert len(own) == values.shape[0] == (5 if split else 1)
        for k, pixels in enumerate(own):
            h, w = int(mask[k].any(1).sum()), int(mask[k].any(0).sum())
            assert pixels.shape == (3, h, w) and pixels.flags.c_contiguous and pixels.dtype == np.float32
            assert np.array_equal(pixels, values[k, :, :h, :w])


def test_built_pixels_stay_8_bit_until_the_tower_reads_them(engines):
    """Collected pixels are the processor's 8-bit images (a quarter of the float bytes); `encode` maps them through
    the value table into the tower's input, giving the features of its float pixels exactly."""
    import numpy as np
    import torch

    from idefics_cli.runtime.vision import VisionInputs, _own_size_pixels, encode

    engine = engines["tiny", True]
    image_processor = engine.processor.image_processor
    pages = [make_image(420, 300, 11), make_image(300, 420, 12)]
    vision = VisionInputs([[pages[0]], [pages[1]]], True).collect(image_processor)
    built = [p for bucket in vision.buckets.values() for _, _, p in bucket]
    assert len(built) == 10 and all(p.dtype == np.uint8 for p in built) and vision.table is not None
    assert sum(p.nbytes for p in built) == sum(3 * p.shape[1] * p.shape[2] for p in built)  # one byte a value
    features = encode(engine.model, vision, 1, image_processor)  # one image a call, as compared below
    with torch.inference_mode():
        for row, page in enumerate(pages):
            own = [torch.from_numpy(p)[None, None] for p in _own_size_pixels(image_processor, page, True)]
            expected = torch.cat([engine.model.model.get_image_features(pixel_values=p, return_dict=True)
                                  .pooler_output[0] for p in own])
            assert torch.equal(features[row], expected)


def test_identical_images_are_encoded_once(engines):
    """A blank page's four equal crops, and a second blank page, reach the tower once; their features are those of
    the image encoded alone. The next call finds the repeats kept and encodes none of them again."""
    import torch
    from PIL import Image

    from idefics_cli.runtime.vision import VisionInputs, _own_size_pixels, encode

    engine = engines["tiny", True]
    image_processor, model = engine.processor.image_processor, engine.model
    blank, page = Image.new("RGB", (420, 300), "white"), make_image(420, 300, 5)
    encoded = []
    hook = model.model.vision_model.register_forward_hook(
        lambda module, args, out: encoded.append(out.last_hidden_state.shape[0]))
    try:
        vision = VisionInputs([[blank], [blank], [page]], True).collect(image_processor)
        features = encode(model, vision, 2, image_processor)
        assert sum(encoded) == 2 + 5  # the blank crop and the blank whole, then the page's five distinct images
        encoded.clear()
        again = encode(model, VisionInputs([[blank]], True).collect(image_processor), 2, image_processor)
        assert encoded == []
    finally:
        hook.remove()
    with torch.inference_mode():
        for row, image in enumerate([blank, blank, page]):
            own = [torch.from_numpy(p)[None, None] for p in _own_size_pixels(image_processor, image, True)]
            expected = torch.cat([model.model.get_image_features(pixel_values=p, return_dict=True).pooler_output[0]
                                  for p in own])
            assert torch.equal(features[row], expected)
    assert torch.equal(again[0], features[0])
