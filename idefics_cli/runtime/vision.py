"""Image features in bounded, same-shape chunks: the vision tower and connector without padding or whole-prompt peaks.

Contract:
- `VisionInputs(rows, split, kwargs)`: each prompt's images (or functions rendering one); pixels from transformers'
  own image processor one source image at a time (its splitting and resizing; `grids[row]`: each image's tiles,
  for families.Family.expand), kept as 8-bit values until `encode` maps them through the processor's value table
  (`value_table`: its float32 values). `collect()` builds them now (numpy only, for a background thread). Used once.
- `encode(model, vision, chunk)`: `get_image_features` over one shape bucket at a time, at most `chunk` images a
  call, no mask; at most `chunk` + one source image's pixels exist at once. Returns each row's features.
- `auto_chunk(model, device)` sizes a chunk from free memory (`IDEFICS_VISION_CHUNK=N` sets it); `prepare(engine,
  batch, split, collect)`: token ids plus a `"vision"` entry (a family whose image tokens depend on the image's
  size: pixels first, the text expanded from their grids). numpy and torch inside functions.
"""

from __future__ import annotations

import os
import weakref

CHUNK_ENV = "IDEFICS_VISION_CHUNK"


class VisionInputs:
    """The source images of each row, and the trimmed pixels built from them so far (bucketed by shape)."""

    def __init__(self, rows: list[list], split: bool, kwargs: dict | None = None):
        self.rows = len(rows)
        self.split, self.kwargs = split, kwargs or {}
        self.grids: list[list[tuple[int, int]]] = [[] for _ in rows]  # (rows, cols) of tiles of each source image
        self.buckets: dict[tuple[int, int], list[tuple[int, int, object]]] = {}  # shape -> [(row, slot, pixels)]
        self.slots = [0] * self.rows  # images (crops) built so far per row
        self.next = 0  # index into `sources` of the next source image to build
        self.sources = [(r, image) for r, row in enumerate(rows) for image in row]  # each dropped once built
        self.table = None  # the processor's value table when the built pixels are its 8-bit images (uint8)

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def build_one(self, image_processor) -> None:
        """Pixels of the next source image: the processor's images for it, each at its real size."""
        row, image = self.sources[self.next]
        self.sources[self.next] = (row, None)  # the source is no longer needed once its pixels exist
        self.next += 1
        image = image() if callable(image) else image  # a page rendered only now (ask)
        images, self.table, grid = _own_size_images(image_processor, image, self.split, self.kwargs)
        self.grids[row].append(grid)
        for pixels in images:
            self.buckets.setdefault(pixels.shape[-2:], []).append((row, self.slots[row], pixels))
            self.slots[row] += 1

    def collect(self, image_processor) -> VisionInputs:
        """Build every pixel now (bounded by the caller's batch); `encode` then only runs the model."""
        while self.next < len(self.sources):
            self.build_one(image_processor)
        return self

    def pixel_bytes(self) -> int:
        return sum(p.nbytes for b in self.buckets.values() for _, _, p in b)


def _own_size_pixels(image_processor, image, split: bool, kwargs: dict | None = None) -> list:
    """The processor's float32 pixels for one source image (crops, then the whole), each at its own size."""
    images, table, _ = _own_size_images(image_processor, image, split, kwargs or {})
    return images if table is None else [_look_up(table, v) for v in images]


def _own_size_images(image_processor, image, split: bool, kwargs: dict) -> tuple[list, object, tuple[int, int]]:
    """The processor's images for one source image (crops, then the whole), each at its own size, contiguous,
    the value table that maps them to its pixels (None: they are its float pixels already), and its grid of tiles
    (rows, cols) as the processor reports it with `kwargs` (0, 0 when it does not split or does not say).

    Asked without padding (`do_pad=False`): the same values as the padded call trimmed with its pixel mask, without
    the zero-filled arrays, masks and stacking copies. Where the processor's rescaling and normalisation map each
    8-bit value on its own (`value_table`), it is asked for its split and resized 8-bit images, kept as they are
    (a quarter of the float bytes) until `encode` maps them through the table into the tower's input: value for
    value what its own float arithmetic gives. A processor that pads anyway gets trimmed with its mask.
    """
    import numpy as np

    table = value_table(image_processor)
    if table is not None:
        out = image_processor([[image]], do_image_splitting=split, do_pad=False, do_rescale=False,
                              do_normalize=False, **kwargs)
        raw = out["pixel_values"][0]
        if all(isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 3 and v.shape[0] == len(table)
               for v in raw) and out.get("pixel_attention_mask") is None:
            return [np.ascontiguousarray(v) for v in raw], table, _grid(out)
    out = image_processor([[image]], do_image_splitting=split, do_pad=False, **kwargs)
    values, mask = out["pixel_values"][0], out.get("pixel_attention_mask")
    if mask is None:
        return [np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for v in values], None, _grid(out)
    mask = mask[0]
    return [np.ascontiguousarray(values[k, :, :int(mask[k].any(axis=1).sum()), :int(mask[k].any(axis=0).sum())])
            for k in range(values.shape[0])], None, _grid(out)


def _grid(out) -> tuple[int, int]:
    rows, cols = out.get("rows"), out.get("cols")
    return (int(rows[0][0]), int(cols[0][0])) if rows is not None and cols is not None else (0, 0)


_TABLES = weakref.WeakKeyDictionary()  # image processor -> its value table (or None)


def value_table(image_processor):
    """What the processor's rescaling + normalisation make of each 8-bit value, per channel ([channels, 256]), or None.

    Asked of the processor itself, once: a 256 x 256 ramp image (every value in every channel, along each row)
    through its own call with no resizing or splitting (a processor that resizes unsplit images to its tile size
    is given 256 px tiles) gives the table; the same ramp asked without rescaling and normalising must come back
    unchanged as 8 bits (so its images are 8-bit before that step). Any other answer (a tensor
    backend, another dtype or layout) gives None, and pixels are asked of the processor whole.
    """
    try:
        return _TABLES[image_processor]
    except (KeyError, TypeError):
        pass
    table = None
    try:
        import numpy as np
        from PIL import Image

        ramp = np.repeat(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2), 256, axis=0)
        common = dict(do_image_splitting=False, do_resize=False, do_pad=False)
        if getattr(image_processor, "max_image_size", None) is not None:
            common["max_image_size"] = {"longest_edge": 256}
        mapped = image_processor([[Image.fromarray(ramp)]], **common)["pixel_values"][0][0]
        same = image_processor([[Image.fromarray(ramp)]], do_rescale=False, do_normalize=False,
                               **common)["pixel_values"][0][0]
        if (isinstance(mapped, np.ndarray) and isinstance(same, np.ndarray) and mapped.shape == (3, 256, 256)
                and same.dtype == np.uint8 and np.array_equal(same, ramp.transpose(2, 0, 1))
                and all(np.array_equal(mapped[:, 0], mapped[:, k]) for k in (1, 255))):
            table = np.ascontiguousarray(mapped[:, 0, :])
    except Exception:  # a processor that refuses these options: ask it for whole pixels
        table = None
    try:
        _TABLES[image_processor] = table
    except TypeError:  # not weakly referable: asked again next time (a few milliseconds)
        pass
    return table


def _look_up(table, image, out=None):
    """`table[c][image[c]]` for each channel, into one float array (`out`), a band of rows at a time (cache-sized)."""
    import numpy as np

    out = np.empty(image.shape, dtype=table.dtype) if out is None else out
    for c in range(image.shape[0]):
        for top in range(0, image.shape[1], 64):
            np.take(table[c], image[c, top:top + 64], out=out[c, top:top + 64])
    return out


def auto_chunk(model, device: str) -> int:
    """Images a vision call: what a quarter of free GPU memory (or a tenth of available RAM, at most 512 MiB) holds.

    Per image: its float32 pixels at the tower's full size (twice: the image and the stacked chunk) plus one
    layer's activations (hidden states, q/k/v, the MLP's intermediate) counted twice for the allocator's slack;
    on the CPU also the attention scores of every head, which its attention kernels may materialise.
    """
    env = os.environ.get(CHUNK_ENV, "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    import torch

    vc = model.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    width = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    per_image = 2 * 3 * vc.image_size ** 2 * 4 + patches * (4 * vc.hidden_size + vc.intermediate_size) * width * 2
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, min(32, int(free * 0.25 // per_image)))
    per_image += patches ** 2 * vc.num_attention_heads * width
    return max(1, min(16, int(min(_available_ram() * 0.1, 2**29) // per_image)))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def encode(model, vision: VisionInputs, chunk: int, image_processor=None) -> list:
    """Features of every row, in prompt order; pixels built (if not collected) and freed chunk by chunk."""
    import torch

    chunk = max(1, chunk)
    features: list[dict[int, object]] = [{} for _ in range(vision.rows)]
    while vision.next < len(vision.sources):
        vision.build_one(image_processor)
        while vision.pending >= chunk:
            _flush(model, vision, max(vision.buckets, key=lambda s: len(vision.buckets[s])), chunk, features)
    for shape in sorted(vision.buckets, key=lambda s: -len(vision.buckets[s])):
        _flush(model, vision, shape, chunk, features)
    return [torch.cat([row[k] for k in range(len(row))]) if row else None for row in features]


def _flush(model, vision: VisionInputs, shape, chunk: int, features) -> None:
    """Encode one bucket, `chunk` images a call, and drop its pixels."""
    import numpy as np
    import torch

    items = vision.buckets.pop(shape)
    while items:
        part, items[:chunk] = items[:chunk], []
        stacked = np.empty((len(part), 1, *part[0][2].shape), dtype=np.float32)  # [n, 1, 3, h, w]: an image a "row"
        for k, (_, _, pixels) in enumerate(part):
            if pixels.dtype == np.uint8:  # the processor's 8-bit image: its float pixels through its value table
                _look_up(vision.table, pixels, out=stacked[k, 0])
            else:
                stacked[k, 0] = pixels
        places = [(row, slot) for row, slot, _ in part]
        part = None  # the images' own arrays go; the stacked copy is what the tower reads
        pixel_values = torch.from_numpy(stacked).to(model.device)
        stacked = None
        with torch.inference_mode():
            out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        pixel_values = None
        for (row, slot), feats in zip(places, out.pooler_output):
            features[row][slot] = feats
        out = None


def prepare(engine, batch: list[tuple[list, str]], split: bool, collect: bool):
    """`engine.build_inputs`'s token ids plus a `"vision"` entry instead of pixels (`collect`: pixels built now).

    A family whose image tokens depend on each image's size has its pixels built now, and the prompts expanded from
    their grids (`engine.tokenize`); other processors than Idefics2's and Idefics3's get `build_inputs` as is.
    """
    processor = engine.processor
    if engine.family.sized:
        vision = VisionInputs([images for images, _ in batch], split, engine.family.image_kwargs)
        vision.collect(processor.image_processor)
        inputs = engine.tokenize([engine.prompt(len(images), question) for images, question in batch], vision)
        inputs["vision"] = vision
        return inputs
    if type(processor).__name__ != "Idefics2Processor" or getattr(processor.image_processor, "do_pad", True) is False:
        return engine.build_inputs(batch, split)
    inputs = engine._processor_call(batch, split, None).to(engine.device)
    vision = VisionInputs([images for images, _ in batch], split)
    inputs["vision"] = vision.collect(engine.processor.image_processor) if collect else vision
    return inputs
