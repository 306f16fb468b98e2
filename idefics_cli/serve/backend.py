"""The server's one adapter to the library: every call into the engine, the processor and the model is here.

Contract (so the server can follow the library's API when it changes, by editing this module only):
- `load(options)` loads an `Engine` the way the CLI does; `describe(engine)` is its model card for /v1/models
  and the settings that key the prefix cache (`settings_key`).
- `prompt_ids(engine, messages)` is the token ids of `processor.apply_chat_template(messages,
  add_generation_prompt=True)` with every image expanded into its image tokens (the text the processor gives
  with the images, computed without pixels), as `ask` and `chat` build their prompts.
- `prefix_length(engine, ids)`: the tokens up to and including the last image token (0 without images): the
  part of a prompt whose key/value cache the server keeps (cache.py).
- `build_pixels(engine, images, stop)`: one prompt's pixels built now (vision.py's `VisionInputs`, collected:
  transformers' image processor, numpy only, no torch op, so it may run in another thread than the model's),
  one source image at a time; None once `stop()` is true between two images.
- `encode_images(engine, images, vision)`: image features of one prompt's images through vision.py (the same
  same-shape chunks `ask` uses), for `prefill`; from `vision` when its pixels were built (`build_pixels`),
  else built from `images` while encoding.
- `prefill(engine, ids, features, prefix)`: one forward pass over a prompt. Without `prefix` the whole prompt
  is run (with `features`); with `prefix` (a `KV` of the first `prefix.length` tokens, not modified) only the
  rest. Returns the last position's logits and the prompt's `KV`.
- `KV` holds per-layer key/value tensors of one row ([1, heads, length, dim]); `KV.head(n)` copies the first
  n positions. Caches are kvcache.py's (decode steps write in place; a tensor handed to one is never written).
  `Batch` is rows of several prompts, left-padded, advanced one token a step by `Batch.step`;
  rows join (`add`) and leave (`keep`) between steps, so a finished row frees its place at once.
- `free_memory(device)`: free GPU memory on CUDA, else available RAM (sizes the prefix cache).
- `tokens_per_image(engine)`: what one image adds to a prompt (to refuse a prompt before rendering).
- `row_grammar(engine, schema)`: a constrained row's grammar state (structured.RowGrammar; its `accept(token)`
  moves it on); `constrain(logits, grammars)` masks in place each row of the logits whose grammar is not None
  (the rows of one step, filled by one batched matcher call): `response_format`.
- `suppressed_ids(engine)`: single-token `bad_words_ids` of the generation config (masked as `generate` does);
  `eos_ids(engine)`, `decode(engine, ids)`.
torch is imported inside functions only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_text_lock = threading.Lock()  # the tokenizer is used from request threads and the worker


def load(options):
    from ..model import load as load_model

    return load_model(options)


def describe(engine) -> dict:
    return {**engine.info, "split": engine.options.split}


def settings_key(engine) -> str:
    info = describe(engine)
    return "|".join(str(info[k]) for k in ("id", "revision", "quantization", "dtype", "device", "split"))


def context_size(engine) -> int | None:
    return engine.context_size


def default_max_tokens(engine) -> int:
    return engine.options.max_new_tokens


def eos_ids(engine) -> set[int]:
    return set(engine.eos_ids)


def image_token_id(engine) -> int:
    return engine.image_token_id


def suppressed_ids(engine) -> list[int]:
    bad = getattr(engine.model.generation_config, "bad_words_ids", None) or []
    return [words[0] for words in bad if len(words) == 1]


def row_grammar(engine, schema):
    from ..structured import row_grammar as make

    return make(engine, schema)


def constrain(logits, grammars: list) -> None:
    from ..structured import mask_rows

    mask_rows(logits, grammars)


def decode(engine, ids: list[int]) -> str:
    with _text_lock:
        return engine.processor.tokenizer.decode(ids, skip_special_tokens=True)


def prompt_ids(engine, messages: list[dict]) -> list[int]:
    processor = engine.processor
    with _text_lock:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return [int(t) for t in processor(text=[text]).input_ids[0]]


def prefix_length(engine, ids: list[int]) -> int:
    image = engine.image_token_id
    last = max((i for i, t in enumerate(ids) if t == image), default=-1)
    return last + 1


def build_pixels(engine, images: list, stop=None):
    """One prompt's pixels, built now (numpy only) one source image at a time; None once `stop()` is true."""
    from ..vision import VisionInputs

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
    from ..vision import VisionInputs, auto_chunk, encode

    if vision is None:
        if not images:
            return None
        vision = VisionInputs([list(images)], engine.options.split)
    chunk = engine.vision_chunk or auto_chunk(engine.model, engine.device)
    return encode(engine.model, vision, chunk, engine.processor.image_processor)[0]


@dataclass
class KV:
    """Key/value tensors of one prompt row: [(keys, values)] per layer, each [1, heads, length, dim]."""

    layers: list
    length: int

    def head(self, n: int) -> KV:
        return KV([(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in self.layers], n)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def _cache(layers):
    """A cache over these tensors that never writes them: the first update copies them into a new buffer."""
    from ..kvcache import new_cache

    return new_cache(layers=[(k, v) for k, v in layers])


def _layers(cache) -> list:
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill(engine, ids: list[int], features=None, prefix: KV | None = None):
    """(last logits [vocab], KV of the whole prompt). With `prefix`, only ids[prefix.length:] are run."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ..kvcache import new_cache

    model = engine.model
    start = prefix.length if prefix is not None else 0
    # a new cache object over the prefix's tensors, which it adopts as full buffers: its first update copies them
    # into a new buffer with spare room and writes there, so the cached prefix itself is never written
    cache = _cache(prefix.layers) if prefix is not None else new_cache()
    input_ids = torch.tensor([ids[start:]], device=model.device)
    kwargs = {}
    if features is not None and prefix is None:
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[features])}
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=torch.ones((1, len(ids)), dtype=torch.long,
                                                                   device=model.device),
                    position_ids=torch.arange(start, len(ids), device=model.device)[None], cache=cache,
                    use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[0, -1].float(), KV(_layers(out.cache), len(ids))


class Batch:
    """Rows of several prompts decoding together: a left-padded cache, its attention mask and positions."""

    def __init__(self, engine):
        self.engine = engine
        self.cache = None  # kvcache.new_cache, [rows, heads, width, dim] per layer
        self.mask = None  # [rows, width] long
        self.positions: list[int] = []  # next position of each row

    @property
    def rows(self) -> int:
        return len(self.positions)

    def add(self, kv: KV) -> None:
        """Append a row (a prefilled prompt), padding it or the batch on the left to a common width."""
        import torch

        device = kv.layers[0][0].device
        ones = torch.ones((1, kv.length), dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask, self.positions = _cache(kv.layers), ones, [kv.length]
            return
        width = max(self.mask.shape[1], kv.length)
        old, old_mask = self._pad(_layers(self.cache), self.mask, width)
        new, new_mask = self._pad(kv.layers, ones, width)
        for layer, (k0, v0), (k1, v1) in zip(self.cache.layers, old, new):
            layer.keys, layer.values = torch.cat([k0, k1]), torch.cat([v0, v1])
        self.mask = torch.cat([old_mask, new_mask])
        self.positions.append(kv.length)

    @staticmethod
    def _pad(layers, mask, width: int):
        import torch.nn.functional as F

        extra = width - mask.shape[1]
        if extra == 0:
            return layers, mask
        return ([(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in layers],
                F.pad(mask, (extra, 0)))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); left columns that no kept row uses are dropped."""
        if not rows:
            self.cache, self.mask, self.positions = None, None, []
            return
        mask = self.mask[rows]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows][:, :, first:], layer.values[rows][:, :, first:]
        self.positions = [self.positions[r] for r in rows]

    def step(self, tokens: list[int]):
        """Feed one token per row; returns the next-token logits [rows, vocab] (float32)."""
        import torch

        model = self.engine.model
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long, device=device)], dim=1)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[t] for t in tokens], device=device), attention_mask=self.mask,
                        position_ids=torch.tensor([[p] for p in self.positions], device=device), cache=self.cache,
                        use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:, -1].float()


def tokens_per_image(engine) -> int:
    """Prompt tokens one image adds (its image tokens and the tokens around them)."""
    from ..prompts import user_turn

    return len(prompt_ids(engine, [user_turn(1, "")])) - len(prompt_ids(engine, [user_turn(0, "")]))


def free_memory(device: str) -> int:
    """Free bytes where the model runs: free GPU memory on CUDA, else available RAM."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    from ..vision import _available_ram

    return int(_available_ram())
