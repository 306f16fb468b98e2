"""`idefics crops DOC`: a PNG contact sheet of the exact images the model receives for one page.

Contract: parsing and printing over the library's `crops` module (docs/crops.md); only the processor is loaded.
The written paths go to stdout, one per line; the panel labels to stderr.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..runtime.families import render_side
from . import options as o

EXAMPLES = """
  idefics crops samples/invoice.pdf                    # invoice-page1-crops.png
  idefics crops report.pdf --page 3 --out p3.png
  idefics crops scan.jpg --no-split --dir crops/       # crops/crop-1-whole.png
  idefics crops report.pdf --dpi 72                    # see what a low-resolution render loses
"""


@o.model_params(1, only=("model", "revision", "offline", "split"),
                fixed={"quant": o.Quant.none, "device": "cpu"})
@o.runs
def crops_command(
    output,
    doc: o.Doc,
    page: Annotated[int, typer.Option("--page", min=1, help="1-based page to show.")] = 1,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="FILE",
                                            help="Where to write the sheet (PNG).")] = None,
    dir_: Annotated[str | None, typer.Option("--dir", metavar="DIR",
                                             help="Write each image separately into this folder.")] = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    opts: o.ModelOptions = None,
) -> int:
    """Show the exact images the model receives for a page. A PNG sheet of the 4 crops and the whole page."""
    from ..documents import open_document
    from ..runtime.model import load_processor
    from ..tasks.crops import model_images, save_crops

    if out is not None and not out.lower().endswith(".png"):
        out += ".png"
    if dir_ is None and out is None:
        stem = "stdin" if doc == "-" else os.path.splitext(os.path.basename(doc.rstrip("/")))[0] or "document"
        out = f"{stem}-page{page}-crops.png"
    with open_document(doc, password=password, dpi=dpi, longest_side=render_side(opts)) as opened:
        image = opened.render(page)
    with output.status(f"Loading the processor of {opts.model}…"):
        processor = load_processor(opts)
    images, names, image_tokens = model_images(processor, image)
    labels = [f"{name} · {im.width}x{im.height} px" for name, im in zip(names, images, strict=True)]
    title = (f"{os.path.basename(doc)} · page {page} · rendered {image.width}x{image.height} px -> "
             f"{len(images)} image(s), {image_tokens} image tokens · {opts.model}")
    written = save_crops(images, names, dir_, out, title, labels)
    for label in labels:
        output.info(label)
    for path in written:
        output.write(path + "\n")
    return 0
