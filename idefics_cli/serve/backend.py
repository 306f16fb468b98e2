"""The server's one adapter to the library: what it asks of the engine, the processor and the model is here.

Contract:
- `describe(engine)` is the loaded engine's card for /v1/models (its `render_side`: the px clients render PDF
  pages at, None for the documents' default) and `settings_key` the settings that key the prefix cache.
- `prompt_ids(engine, messages, images)`: the chat template's token ids, every image expanded into its tokens
  without pixels (a sized family: each image's grid from its image processor's `get_number_of_image_patches`), as
  `ask` and `chat` build theirs; `prefix_length(engine, ids)`: the tokens up to the last image token (the part
  whose key/value cache the server keeps, cache.py).
- `build_pixels(engine, images, stop)`: one prompt's pixels built now (numpy only, so another thread may do it);
  `encode_images(engine, images, vision)`: their features through vision.py, for the decode loop's prefill.
- `tokens_per_image`, `free_memory(device)` (GPU, else RAM), `token_text`. torch inside functions.
"""

from __future__ import annotations


def describe(engine) -> dict:
    return {**engine.info, "split": engine.options.split, "render_side": engine.render_side}


def settings_key(engine) -> str:
    info = describe(engine)
    return "|".join(str(info[k]) for k in ("id", "revision", "quantization", "dtype", "device", "split"))


def context_size(engine) -> int | None:
    return engine.context_size


def default_max_tokens(engine) -> int:
    return engine.options.max_new_tokens


def image_token_id(engine) -> int:
    return engine.image_token_id


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
    """One prompt's pixels, built now (numpy only) one source image at a time; None once `stop()` is true."""
    from ..runtime.vision import VisionInputs

    vision = VisionInputs([list(images)], engine.options.split)
    image_processor = engine.processor.image_processor
    while vision.next < len(vision.sources):
        if stop is not None and stop():
            return None
        vision.build_one(image_processor)
    return vision


def encode_images(engine, images: list, vision=None):
    """Features of one prompt's images ([images x image_seq_len, hidden]), or None without images.

    `vision`: the prompt's pixels from `build_pixels` (then `images` are not used), consumed here."""
    from ..runtime.vision import VisionInputs, auto_chunk, encode

    if vision is None:
        if not images:
            return None
        vision = VisionInputs([list(images)], engine.options.split)
    chunk = engine.vision_chunk or auto_chunk(engine.model, engine.device)
    return encode(engine.model, vision, chunk, engine.processor.image_processor)[0]


def tokens_per_image(engine) -> int:
    """Prompt tokens one image adds (its image tokens and the tokens around them)."""
    from ..prompts import user_turn

    return len(prompt_ids(engine, [user_turn(1, "")])) - len(prompt_ids(engine, [user_turn(0, "")]))


def free_memory(device: str) -> int:
    """Free bytes where the model runs: free GPU memory on CUDA, else available RAM."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    from ..runtime.vision import _available_ram

    return int(_available_ram())
