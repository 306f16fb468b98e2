"""What the processor really feeds the model for one page: its images, taken back out, and a contact sheet.

Contract: `model_images(processor, image)` takes the images back out of the processor's `pixel_values`, exactly the
pixels the vision encoder sees (5 with idefics2 splitting, 1 without). `contact_sheet` lays them out under labels;
`save_crops` writes `crop-<k>-<position>.png` files and/or the sheet, each beside and renamed (a failed write:
`output_error`, what was there kept; one onto the document or onto another of them: `usage`, nothing written).
torch and PIL are imported inside functions only.
"""
from __future__ import annotations

import io
import os

from ..errors import IdeficsError, UsageError

POSITIONS_5 = ("top-left", "top-right", "bottom-left", "bottom-right", "whole")


def position_names(n: int) -> list[str]:
    if n == len(POSITIONS_5):
        return list(POSITIONS_5)
    return [f"tile-{k + 1}" for k in range(n - 1)] + ["whole"]


def denormalize(pixel_values, pixel_attention_mask, image_processor) -> list:
    """[n, 3, H, W] normalized floats (+ [n, H, W] mask) -> n RGB PIL images, padding cropped away."""
    import numpy as np
    import torch
    from PIL import Image

    x = pixel_values.detach().to("cpu", torch.float64)
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(1, -1, 1, 1)
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / image_processor.rescale_factor
    pixels = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = []
    for k in range(pixels.shape[0]):
        arr = pixels[k]
        if pixel_attention_mask is not None:
            mask = pixel_attention_mask[k].bool().cpu().numpy()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size and cols.size:
                arr = arr[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        images.append(Image.fromarray(np.ascontiguousarray(arr), "RGB"))
    return images


def model_images(processor, image) -> tuple[list, list[str], int]:
    """(images the model sees for one page, their position names, image tokens in the prompt)."""
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    mask = inputs.get("pixel_attention_mask")
    images = denormalize(inputs["pixel_values"][0], None if mask is None else mask[0], processor.image_processor)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return images, position_names(len(images)), int((inputs["input_ids"][0] == image_token_id).sum())


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def font_size(sizes: list[tuple[int, int]]) -> int:
    """Label font size in px, growing with the panels so labels stay readable when the sheet is scaled down."""
    return max(14, min(40, min(w for w, _ in sizes) // 28))


def sheet_layout(sizes: list[tuple[int, int]]):
    """Top-left corners of each panel (the image, under its label strip) and the sheet size."""
    fs = font_size(sizes)
    label_h, gap, top = int(fs * 1.6), max(8, fs // 2), int(fs * 2.6)
    if len(sizes) == 5:  # 2 x 2 crops in their places, the whole page to the right
        col_w = [max(sizes[0][0], sizes[2][0]), max(sizes[1][0], sizes[3][0])]
        row_h = [max(sizes[0][1], sizes[1][1]), max(sizes[2][1], sizes[3][1])]
        xs, ys = [gap, 2 * gap + col_w[0]], [top + label_h, top + 2 * label_h + gap + row_h[0]]
        corners = [(xs[k % 2], ys[k // 2]) for k in range(4)]
        corners.append((3 * gap + sum(col_w), top + label_h))
        width = corners[4][0] + sizes[4][0] + gap
        height = max(ys[1] + row_h[1], corners[4][1] + sizes[4][1]) + gap
        return corners, (width, height)
    corners, x = [], gap
    for w, _ in sizes:
        corners.append((x, top + label_h))
        x += w + gap
    return corners, (x, top + label_h + max(h for _, h in sizes) + gap)


def contact_sheet(panels: list, labels: list[str], title: str):
    """One PNG-ready image: a title line, then every panel under its label (placed by `sheet_layout`)."""
    from PIL import Image, ImageDraw

    sizes = [p.size for p in panels]
    corners, size = sheet_layout(sizes)
    fs = font_size(sizes)
    sheet = Image.new("RGB", size, (34, 34, 38))
    draw = ImageDraw.Draw(sheet)
    draw.text((max(8, fs // 2), fs // 2), title, fill=(240, 240, 240), font=_font(int(fs * 1.2)))
    font = _font(fs)
    for panel, label, (x, y) in zip(panels, labels, corners, strict=True):
        draw.text((x, y - int(fs * 1.35)), label, fill=(255, 214, 102), font=font)
        sheet.paste(panel, (x, y))
    return sheet


def _save_png(image, path: str) -> None:
    """Written beside `path` and renamed onto it (writers.replace_file): a failed write leaves what was there."""
    from .writers import replace_file

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        replace_file(path, buf.getvalue())
    except OSError as exc:
        exc.filename = path  # not the temporary file's name
        raise


def save_crops(images: list, names: list[str], folder: str | None, sheet_path: str | None, title: str,
               labels: list[str], document: str | None = None) -> list[str]:
    """Write the images into `folder` and/or the contact sheet to `sheet_path`; the paths written, in order. A path
    that is `document` itself or another of them is a `UsageError`, before anything is written."""
    paths = [os.path.join(folder, f"crop-{k}-{name}.png") for k, name in enumerate(names, 1)] \
        if folder is not None else []
    from .writers import same_file

    for k, path in enumerate(paths + ([sheet_path] if sheet_path is not None else [])):
        if document and same_file(path, document):
            raise UsageError(f"{path} would overwrite the document itself", "choose another --out or --dir")
        if os.path.realpath(path) in map(os.path.realpath, paths[:k]):
            raise UsageError(f"--out {path} would overwrite a crop of --dir", "choose another --out")
    written = []
    try:
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            for path, im in zip(paths, images, strict=True):
                _save_png(im, path)
                written.append(path)
        if sheet_path is not None:
            os.makedirs(os.path.dirname(sheet_path) or ".", exist_ok=True)
            _save_png(contact_sheet(images, labels, title), sheet_path)
            written.append(sheet_path)
    except OSError as exc:
        where = exc.filename or "the output"
        raise IdeficsError("output_error", f"cannot write {where}: {exc.strerror or exc}") from exc
    return written
