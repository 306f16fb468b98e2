"""What moves the vision tower on SmolVLM-256M's shapes: blank-tile reuse, attention, threads, chunk, tiles.

    python bench/vision.py [--pages 2] [--reps 1] [--sides 'chunk 1,eager'] [--settle 180] [--smoke]

Each side is a fresh process that loads the random SmolVLM-256M-shape Idefics3 (float32, CPU, unquantized, as
`--quant auto` picks) with idefics-cli's own loader, renders samples/report.pdf's first `--pages` pages at 2048 px
as `transcribe` does, builds their tiles with the processor (12 + 1 a page), and times
`runtime/vision.encode` over all of them in one call (one untimed warm-up tile first). Sides:
- default: what `transcribe` does (sdpa attention, 2 threads, the auto chunk, identical tiles encoded once);
- no reuse: every tile encoded, blank or not (the digest made unique per tile);
- eager: eager attention in the tower; 1 thread: `torch.set_num_threads(1)`; chunk 1 / 2 / 13: tiles a call;
- no split: `--no-split`, the global image alone (1 tile a page).
Prints seconds a page, tiles encoded and each side's ratio of the default's seconds a page. `--smoke`: the tiny
Idefics3, 1 page, three sides.
"""

from __future__ import annotations

import os
import sys
import tempfile

import common as c

SIDES = {
    "default": {},
    "no reuse": {"reuse": False},
    "eager": {"attn": "eager"},
    "1 thread": {"threads": 1},
    "chunk 1": {"chunk": 1},
    "chunk 2": {"chunk": 2},
    "chunk 13": {"chunk": 13},
    "no split": {"split": False},
}


def child(model: str, pdf: str, reuse: bool = True, attn: str = "sdpa", threads: int = 2, chunk: int = 0,
          split: bool = True) -> dict:
    import time

    import torch

    from idefics_cli.documents import open_document
    from idefics_cli.interface import ModelOptions
    from idefics_cli.runtime import vision
    from idefics_cli.runtime.model import load_engine

    torch.set_num_threads(threads)
    engine = load_engine(ModelOptions(model=model, quant="none", device="cpu", offline=True, split=split))
    if attn != "sdpa":
        engine.model.set_attn_implementation(attn)
    if not reuse:
        vision._Repeats.key = lambda self, row, slot, pixels: (row, slot)
    with open_document(pdf, longest_side=engine.render_side) as doc:
        pages = [doc.render(p) for p in range(1, doc.page_count + 1)]
    image_processor, kwargs = engine.processor.image_processor, engine.family.image_kwargs
    chunk = chunk or vision.auto_chunk(engine.model, "cpu")
    warm = vision.VisionInputs([[pages[0]]], False, kwargs).collect(image_processor)
    vision.encode(engine.model, warm, 1, image_processor)
    vision._Repeats._kept.clear()
    inputs = vision.VisionInputs([[page] for page in pages], split, kwargs).collect(image_processor)
    tiles = inputs.pending
    encoded = []
    hook = engine.model.model.vision_model.register_forward_hook(
        lambda module, args, out: encoded.append(out.last_hidden_state.shape[0]))
    start = time.perf_counter()
    vision.encode(engine.model, inputs, chunk, image_processor)
    seconds = time.perf_counter() - start
    hook.remove()
    return {"s_page": seconds / len(pages), "tiles": tiles, "encoded": sum(encoded), "chunk": chunk}


def main(argv=None) -> int:
    from families import sample_pages

    p = c.parser(__doc__, reps=1)
    p.add_argument("--pages", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES), help="which sides, comma-separated (default all)")
    args = c.parse_or_child(p, argv, child)
    if args is None:
        return 0
    reps, pages = (1, 1) if args.smoke else (args.reps, args.pages)
    c.header("vision tower knobs, SmolVLM-256M shapes", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "smolvlm-256m", family="idefics3")
    with tempfile.TemporaryDirectory() as tmp:
        pdf = sample_pages(os.path.join(tmp, "pages.pdf"), pages)
        chosen = ["default", "no reuse", "no split"] if args.smoke else ["default", *args.sides.split(",")]
        sides = {k: v for k, v in SIDES.items() if k in chosen}
        runs = c.interleave({name: (lambda spec=spec: c.in_child(__file__, {"model": model, "pdf": pdf, **spec}))
                             for name, spec in sides.items()}, reps)
    base = c.median(r["s_page"] for r in runs["default"])
    rows = []
    for name, side in runs.items():
        s = c.median(r["s_page"] for r in side)
        rows.append([name, c.fmt(s, " s"), f"{side[0]['encoded']} of {side[0]['tiles']}", side[0]["chunk"],
                     f"{s / base:.3f}x"])
    c.table(f"vision tower over {pages} pages of samples/report.pdf, SmolVLM-256M shapes, float32, median of {reps}",
            rows, ["side", "s a page", "tiles encoded", "chunk", "ratio"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
