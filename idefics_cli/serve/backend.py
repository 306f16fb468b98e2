"""The server's one adapter to the engine, its processor and its model.

Contract: `describe(engine)` is the /v1/models card (`render_side`: the px clients render PDF pages at, None: the
documents' default); `settings_key` keys the prefix cache. `prompt_ids(engine, messages, images)`: the template's
ids, images expanded as `ask` does; `prefix_length`: tokens up to the last image token. `build_pixels` (numpy only,
any thread) and `encode_images` (vision.py) make a prompt's features. torch inside functions only.
"""

from __future__ import annotations


def describe(engine) -> dict:
    return {**engine.info, "split": engine.options.split, "render_side": engine.render_side,
            "doctags": engine.doctags}


def settings_key(engine) -> str:
    info = describe(engine)
    return "|".join(str(info[k]) for k in ("id", "revision", "quantization", "dtype", "device", "split"))


def token_text(engine, token: int) -> str:
    """One token's text as it reads after other text (its leading space kept; cached): a top_logprobs entry."""
    texts = engine.__dict__.setdefault("_token_texts", {})
    if token not in texts:
        with engine.text_lock:
            tokenizer = engine.processor.tokenizer
            anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
            texts[token] = tokenizer.decode([anchor, token])[len(tokenizer.decode([anchor])):]
    return texts[token]


def prompt_ids(engine, messages: list[dict], images: list | None = None) -> list[int]:
    """`images`: the prompt's images in order (their sizes decide a sized family's tokens; None: one tile each)."""
    processor = engine.processor
    with engine.text_lock:  # the tokenizer is shared with the decode loop's thread
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        if not engine.family.sized:
            return [int(t) for t in processor(text=[text]).input_ids[0]]
        n = text.count(processor.image_token)
        kwargs = {"do_image_splitting": engine.options.split}
        grids = [(0, 0)] * n if images is None else [
            tuple(processor.image_processor.get_number_of_image_patches(im.height, im.width, kwargs)[1:])
            for im in images]
        text = engine.family.expand(processor, [text], grids)[0] if grids else text
        return [int(t) for t in processor.tokenizer(text).input_ids]


def prefix_length(engine, ids: list[int]) -> int:
    image = engine.image_token_id
    last = max((i for i, t in enumerate(ids) if t == image), default=-1)
    return last + 1


def build_pixels(engine, images: list, stop=None):
    """One prompt's pixels, built one source image at a time; None once `stop()` is true."""
    from ..runtime.vision import VisionInputs

    vision = VisionInputs([list(images)], engine.options.split)
    image_processor = engine.processor.image_processor
    while vision.next < len(vision.sources):
        if stop is not None and stop():
            return None
        vision.build_one(image_processor)
    return vision


def encode_images(engine, images: list, vision=None):
    """Features of one prompt's images (or of `vision`, its `build_pixels`), or None without images."""
    from ..runtime.vision import VisionInputs, auto_chunk, encode

    if vision is None:
        if not images:
            return None
        vision = VisionInputs([list(images)], engine.options.split)
    chunk = engine.vision_chunk or auto_chunk(engine.model, engine.device)
    return encode(engine.model, vision, chunk, engine.processor.image_processor)[0]


def tokens_per_image(engine) -> int:
    """Prompt tokens one image adds (its image tokens and the tokens around them)."""
    from ..interface import user_turn

    return len(prompt_ids(engine, [user_turn(1, "")])) - len(prompt_ids(engine, [user_turn(0, "")]))

