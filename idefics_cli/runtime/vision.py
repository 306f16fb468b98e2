"""Image features in bounded, same-shape chunks: the vision tower and connector without padding or whole-prompt peaks.

`VisionInputs(rows, split, kwargs)`: each prompt's images (or functions rendering one), built one source image at a
time by the processor itself (`grids`: tiles per image), kept 8-bit until `encode(model, vision, chunk)` runs one
shape bucket, `chunk` images a call. Identical images (blank tiles, mostly) are encoded once: by content digest
within a call, and across calls for the model's last `REPEATS` repeated ones. `auto_chunk` sizes a chunk.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import Counter, OrderedDict

CHUNK_ENV = "IDEFICS_VISION_CHUNK"
REPEATS = 8  # features of images seen twice in one call, kept per model for later calls


class VisionInputs:
    """The source images of each row, and the trimmed pixels built from them so far (bucketed by shape)."""

    def __init__(self, rows: list[list], split: bool, kwargs: dict | None = None):
        self.rows = len(rows)
        self.split, self.kwargs = split, kwargs or {}
        self.grids: list[list[tuple[int, int]]] = [[] for _ in rows]  # (rows, cols) of tiles of each source image
        self.buckets: dict[tuple[int, int], list[tuple[int, int, object]]] = {}  # shape -> [(row, slot, pixels)]
        self.slots = [0] * self.rows  # images (crops) built so far per row
        self.next = 0  # the next of `sources` to build (each dropped once built)
        self.sources = [(r, image) for r, row in enumerate(rows) for image in row]
        self.table = None  # the processor's value table when the built pixels are 8-bit
        self.digests: dict[tuple[int, int], bytes] = {}  # (row, slot) -> content digest of its pixels

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def build_one(self, image_processor) -> None:
        """Pixels of the next source image, each at its real size."""
        row, image = self.sources[self.next]
        self.sources[self.next] = (row, None)  # the source is no longer needed once its pixels exist
        self.next += 1
        image = image() if callable(image) else image  # a page rendered only now (ask)
        images, self.table, grid = _own_size_images(image_processor, image, self.split, self.kwargs)
        self.grids[row].append(grid)
        for pixels in images:
            self.digests[row, self.slots[row]] = hashlib.blake2b(pixels, digest_size=16).digest()
            self.buckets.setdefault(pixels.shape[-2:], []).append((row, self.slots[row], pixels))
            self.slots[row] += 1

    def collect(self, image_processor) -> VisionInputs:
        """Build every pixel now (numpy only: for a background thread); `encode` then only runs the model."""
        while self.next < len(self.sources):
            self.build_one(image_processor)
        return self


def _own_size_pixels(image_processor, image, split: bool, kwargs: dict | None = None) -> list:
    """The processor's float32 pixels for one source image (crops, then the whole), each at its own size."""
    images, table, _ = _own_size_images(image_processor, image, split, kwargs or {})
    return images if table is None else [_look_up(table, v) for v in images]


def _own_size_images(image_processor, image, split: bool, kwargs: dict) -> tuple[list, object, tuple[int, int]]:
    """(the processor's unpadded images for one source image (crops, then the whole), the value table mapping them
    to its pixels (None: float pixels already), its (rows, cols) grid of tiles, (0, 0) if not split). With a table
    the images stay 8-bit; a processor that pads anyway is trimmed with its mask."""
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
    """What the processor's rescaling + normalisation make of each 8-bit value ([channels, 256]), or None.
    Asked of the processor once with a 256 x 256 ramp image, which must come back unchanged without that step."""
    if image_processor in _TABLES:
        return _TABLES[image_processor]
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
    _TABLES[image_processor] = table
    return table


def _look_up(table, image, out=None):
    """`table[c][image[c]]` for each channel, into one float array (`out`), 64 rows at a time."""
    import numpy as np

    out = np.empty(image.shape, dtype=table.dtype) if out is None else out
    for c in range(image.shape[0]):
        for top in range(0, image.shape[1], 64):
            np.take(table[c], image[c, top:top + 64], out=out[c, top:top + 64])
    return out


def auto_chunk(model, device: str) -> int:
    """Images a vision call (`IDEFICS_VISION_CHUNK` sets it): what a quarter of free GPU memory, or a tenth of
    available RAM up to 512 MiB, holds of pixels (twice) and one layer's activations (twice; CPU: + attention)."""
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


class _Repeats:
    """Features by content (digest, shape, value table) for one `encode` call, seeded with the model's kept repeats."""

    _kept = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> features), at most REPEATS
    _lock = threading.Lock()

    def __init__(self, model, vision: VisionInputs):
        table = vision.table
        self.salt = b"" if table is None else hashlib.blake2b(table.tobytes(), digest_size=8).digest()
        self.vision, self.found, self.uses = vision, {}, Counter()
        with self._lock:
            self.kept = self._kept.setdefault(model, OrderedDict())
            self.found.update(self.kept)

    def key(self, row: int, slot: int, pixels) -> tuple:
        return self.vision.digests[row, slot], pixels.shape, pixels.dtype.str, self.salt

    def keep(self) -> None:
        """Remember this call's repeated images for the next calls (the most recent REPEATS)."""
        with self._lock:
            for key, uses in self.uses.items():
                if key in self.kept:  # used again: stays, as the most recent
                    self.kept.move_to_end(key)
                elif uses > 1:
                    self.kept[key] = self.found[key].clone()
            while len(self.kept) > REPEATS:
                self.kept.popitem(last=False)


def encode(model, vision: VisionInputs, chunk: int, image_processor=None) -> list:
    """Features of every row, in prompt order; pixels built (if not collected) and freed chunk by chunk."""
    import torch

    chunk = max(1, chunk)
    features: list[dict[int, object]] = [{} for _ in range(vision.rows)]
    repeats = _Repeats(model, vision)
    while vision.next < len(vision.sources):
        vision.build_one(image_processor)
        while vision.pending >= chunk:
            _flush(model, vision, max(vision.buckets, key=lambda s: len(vision.buckets[s])), chunk, features,
                   repeats)
    for shape in sorted(vision.buckets, key=lambda s: -len(vision.buckets[s])):
        _flush(model, vision, shape, chunk, features, repeats)
    repeats.keep()
    return [torch.cat([row[k] for k in range(len(row))]) if row else None for row in features]


def _flush(model, vision: VisionInputs, shape, chunk: int, features, repeats: _Repeats) -> None:
    """Encode one bucket's distinct images, `chunk` a call, give every place its features, and drop the pixels."""
    import numpy as np
    import torch

    places: dict[tuple, list[tuple[int, int]]] = {}  # key -> the (row, slot)s waiting for its features
    items = []
    for row, slot, pixels in vision.buckets.pop(shape):
        key = repeats.key(row, slot, pixels)
        repeats.uses[key] += 1
        if key in repeats.found:
            features[row][slot] = repeats.found[key]
        elif key in places:
            places[key].append((row, slot))
        else:
            places[key] = [(row, slot)]
            items.append((key, pixels))
    while items:
        part, items[:chunk] = items[:chunk], []
        stacked = np.empty((len(part), 1, *part[0][1].shape), dtype=np.float32)  # [n, 1, 3, h, w]: an image a "row"
        for k, (_, pixels) in enumerate(part):
            if pixels.dtype == np.uint8:  # the processor's 8-bit image: its float pixels through its value table
                _look_up(vision.table, pixels, out=stacked[k, 0])
            else:
                stacked[k, 0] = pixels
        keys = [key for key, _ in part]
        part = None  # the images' own arrays go; the stacked copy is what the tower reads
        pixel_values = torch.from_numpy(stacked).to(model.device)
        stacked = None
        with torch.inference_mode():
            out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        pixel_values = None
        for key, feats in zip(keys, out.pooler_output):
            repeats.found[key] = feats
            for row, slot in places.pop(key):
                features[row][slot] = feats
        out = None
