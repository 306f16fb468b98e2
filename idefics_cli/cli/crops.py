"""`idefics crops DOC`: a PNG contact sheet of the exact images the model receives for one page.

Contract: parsing and printing over the library's `crops` module. Only the processor is loaded (no model
weights, `model.load_processor`). The page is rendered as `ask` renders it, run through the processor, and
the images are taken back out of `pixel_values` (de-normalized, padding cropped with
`pixel_attention_mask`), so the sheet shows the real pixels: with splitting 4 crops + the whole page,
without it the whole page alone; the count is read from the processor output. Each panel is labelled with
its position and size. `--out` names the sheet (default `<doc>-page<N>-crops.png`); `--dir` writes each
image as `crop-<k>-<position>.png` instead (plus the sheet when `--out` is given too). The written paths
go to stdout, one per line.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..runtime.families import render_side
from . import options as o

EPILOG = """Examples:

\b
  idefics crops samples/invoice.pdf                    # invoice-page1-crops.png
  idefics crops report.pdf --page 3 --out p3.png
  idefics crops scan.jpg --no-split --dir crops/       # crops/crop-1-whole.png
  idefics crops report.pdf --dpi 72                    # see what a low-resolution render loses
"""


@o.model_params(1, only=("model", "revision", "offline", "split"),
                fixed={"quant": o.Quant.none, "device": "cpu"})
def crops_command(
    doc: Annotated[str, typer.Argument(metavar="DOC", show_default=False, help="A PDF or image (- for stdin).")],
    page: Annotated[int, typer.Option("--page", min=1, help="1-based page to show.", rich_help_panel=o.DOC_PANEL)] = 1,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="FILE",
                                            help="Where to write the sheet (PNG).")] = None,
    dir_: Annotated[str | None, typer.Option("--dir", metavar="DIR",
                                             help="Write each image separately into this folder.")] = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    opts: o.ModelOptions = None,
) -> None:
    """Show the exact images the model receives for a page. A PNG sheet of the 4 crops and the whole page."""
    from ..output import Output

    output = Output()
    o.run_and_exit(lambda: _crops(output, doc, page, out, dir_, dpi, password, opts), output)


def default_sheet_name(doc: str, page: int) -> str:
    stem = "stdin" if doc == "-" else os.path.splitext(os.path.basename(doc.rstrip("/")))[0] or "document"
    return f"{stem}-page{page}-crops.png"


def _crops(out, doc_path, page, sheet_path, dir_, dpi, password, opts) -> int:
    from ..documents import open_document
    from ..runtime.model import load_processor
    from ..tasks.crops import model_images, save_crops

    if sheet_path is not None and not sheet_path.lower().endswith(".png"):
        sheet_path += ".png"
    if dir_ is None and sheet_path is None:
        sheet_path = default_sheet_name(doc_path, page)
    with open_document(doc_path, password=password, dpi=dpi, longest_side=render_side(opts)) as doc:
        image = doc.render(page)
    with out.status(f"Loading the processor of {opts.model}…"):
        processor = load_processor(opts)
    images, names, image_tokens = model_images(processor, image)
    labels = [f"{name} · {im.width}x{im.height} px" for name, im in zip(names, images, strict=True)]
    title = (f"{os.path.basename(doc_path)} · page {page} · rendered {image.width}x{image.height} px -> "
             f"{len(images)} image(s), {image_tokens} image tokens · {opts.model}")
    written = save_crops(images, names, dir_, sheet_path, title, labels)
    for label in labels:
        out.info(label)
    for path in written:
        out.write(path + "\n")
    return 0
