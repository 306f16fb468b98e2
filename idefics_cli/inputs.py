"""Pixel inputs of a batch, built one row at a time into the padded batch the processor would return.

Contract: `pixels(image_processor, rows, split)` returns `{"pixel_values": float32 tensor
[rows, images, 3, H, W], "pixel_attention_mask": bool tensor [rows, images, H, W]}` equal, value for value,
to the `pixel_values` and `pixel_attention_mask` of one Idefics2 processor call over all the rows (images
zero-padded to the largest height, width and image count of the batch, the mask 1 where an image is).
Each row (a prompt's images) goes through transformers' own image processor alone, with its image
splitting, and is copied into a batch array allocated once, so the memory of a batch is its output plus one
row's working space instead of the processor's several full-batch copies (1.2 GiB for 8 split pages against
0.34 GiB of output, and in about half the time; bench/memory.py).
Rows without images stay zero, as the processor pads them. numpy and torch are imported inside functions.
"""

from __future__ import annotations


def row_by_row(processor) -> bool:
    """True for processors whose text does not depend on the pixels (Idefics2: a fixed number of image tokens)."""
    image_processor = getattr(processor, "image_processor", None)
    return (type(processor).__name__ == "Idefics2Processor" and getattr(image_processor, "do_pad", True) is not False)


def pixels(image_processor, rows: list[list], split: bool) -> dict:
    import torch

    values = mask = None
    for i, row in enumerate(rows):
        if not row:
            continue
        out = image_processor([list(row)], do_image_splitting=split)
        row_values, row_mask = out["pixel_values"][0], out["pixel_attention_mask"][0]
        values, mask = _fit(values, mask, len(rows), row_values.shape)
        n, _, h, w = row_values.shape
        values[i, :n, :, :h, :w] = row_values
        mask[i, :n, :h, :w] = row_mask
        del out, row_values, row_mask
    if values is None:
        return {}
    return {"pixel_values": torch.from_numpy(values), "pixel_attention_mask": torch.from_numpy(mask)}


def _fit(values, mask, rows: int, shape: tuple):
    """The batch arrays, grown (zero-padded) if this row has more images or larger ones than any before."""
    import numpy as np

    n, channels, h, w = shape
    if values is not None:
        _, old_n, _, old_h, old_w = values.shape
        if n <= old_n and h <= old_h and w <= old_w:
            return values, mask
        n, h, w = max(n, old_n), max(h, old_h), max(w, old_w)
    new_values = np.zeros((rows, n, channels, h, w), dtype=np.float32)  # calloc: pages are touched as rows land
    new_mask = np.zeros((rows, n, h, w), dtype=bool)
    if values is not None:
        new_values[:, :old_n, :, :old_h, :old_w] = values
        new_mask[:, :old_n, :old_h, :old_w] = mask
    return new_values, new_mask
