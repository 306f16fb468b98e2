"""P15: `idefics transcribe` against docling's own VLM pipeline (SmolDocling through transformers), same pages.

    python bench/docling_peer.py [--docling-python PY] [--reps 1] [--pages 4] [--max-new-tokens 256] [--smoke]

docling runs in its own environment (`pip install 'docling[vlm]'` pins its own torch and transformers):
`--docling-python` (or $IDEFICS_DOCLING_PYTHON) names its interpreter; without one that imports docling, P15 is
skipped (exit 0). The model is a random SmolDocling-256M-shape folder (tiny.py `--family smoldocling --size
smolvlm-256m`), float32 on the CPU, handed to docling offline as its artifacts folder. Sides, interleaved, each
with its model loaded before the clock: docling (bench/docling_side.py, its defaults: page scale 2.0, its page
batch) and `idefics transcribe` (its summary's pages/s: its clock starts once the weights are loaded), over
samples/report.pdf's pages. Target: >= 1.5x.
Then the same DocTags at batch 1: page 1 as a 2048-px PNG through both (docling at scale 1.0, so that both hand
the processor the same pixels). `--smoke`: the tiny SmolDocling, 2 pages, 8 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common as c
from families import SUMMARY, sample_pages

REPO_ID = "docling-project--SmolDocling-256M-preview"  # the folder name docling looks for under its artifacts path


def docling_python(given: str | None) -> str | None:
    """An interpreter that imports docling: `given`, $IDEFICS_DOCLING_PYTHON, or this one; None if none does."""
    for python in (given, os.environ.get("IDEFICS_DOCLING_PYTHON"), sys.executable):
        if python and subprocess.run([python, "-c", "import docling.pipeline.vlm_pipeline"], capture_output=True,
                                     env=c.env()).returncode == 0:
            return python
    return None


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=1)
    p.add_argument("--docling-python", help="an interpreter with docling[vlm] installed")
    p.add_argument("--pages", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    python = docling_python(args.docling_python)
    if python is None:
        print("P15 skipped: no interpreter here imports docling (pip install 'docling[vlm]' in its own venv, then "
              "pass --docling-python or set IDEFICS_DOCLING_PYTHON); nothing was measured", flush=True)
        return 0
    reps, pages, n = (1, 2, 8) if args.smoke else (args.reps, args.pages, args.max_new_tokens)
    c.header("P15 docling's VLM pipeline side by side", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "smolvlm-256m", family="smoldocling")
    with tempfile.TemporaryDirectory() as tmp:
        art = os.path.join(tmp, "artifacts")
        os.makedirs(art)
        os.symlink(model, os.path.join(art, REPO_ID))
        pdf = sample_pages(os.path.join(tmp, "pages.pdf"), pages)
        side = os.path.join(c.HERE, "docling_side.py")

        def docling(source: str, tokens: int, scale: float) -> dict:
            r = c.run([python, side, art, source, str(tokens), str(scale)])
            result = json.loads(r.stdout.strip().splitlines()[-1])
            if "SUCCESS" not in result["status"] or result["pages"] != (pages if source == pdf else 1):
                raise SystemExit(f"docling did not convert {source}: {result}")
            return {**result, "wall": r.wall, "rss": r.max_rss_mib}

        def idefics(source: str, tokens: int, *flags: str) -> dict:
            out = tempfile.mkdtemp(dir=tmp)  # its own records: --force keeps other files' records
            r = c.run([*c.idefics_cmd(), "transcribe", source, "--out", out, "--force", "--model", model,
                       "--device", "cpu", "--max-new-tokens", str(tokens), *flags])
            match = SUMMARY.search(r.stderr)
            if not match:
                raise SystemExit(f"no summary in the CLI's stderr:\n{r.stderr[-2000:]}")
            with open(os.path.join(out, "records.jsonl")) as f:
                texts = [json.loads(line)["text"] for line in f]
            return {"seconds": float(match.group(2)), "texts": texts, "wall": r.wall, "rss": r.max_rss_mib}

        runs = c.interleave({"docling": lambda: docling(pdf, n, 2.0), "idefics": lambda: idefics(pdf, n)}, reps)
        png = os.path.join(tmp, "page1.png")
        render_png(pdf, png, 2048)
        same_d = docling(png, 64 if not args.smoke else 8, 1.0)["texts"][0]
        same_i = idefics(png, 64 if not args.smoke else 8, "--batch-size", "1")["texts"][0]
    rate = {name: pages / c.median(r["seconds"] for r in side) for name, side in runs.items()}
    ratio = rate["idefics"] / rate["docling"]
    rows = [[f"docling {version(python)} VlmPipeline (SmolDocling preset, transformers; baseline)",
             f"{rate['docling']:.4f}", f"{1 / rate['docling']:.1f} s", "1.00x",
             f"{c.median(r['rss'] for r in runs['docling']):.0f} MiB", ""],
            ["idefics transcribe (--batch-size auto)", f"{rate['idefics']:.4f}", f"{1 / rate['idefics']:.1f} s",
             f"{ratio:.2f}x", f"{c.median(r['rss'] for r in runs['idefics']):.0f} MiB",
             c.verdict(ratio, 1.5, at_most=False)]]
    c.table(f"P15 {pages} pages of samples/report.pdf, {n} new tokens a page, SmolDocling-256M shapes, float32, "
            f"median of {reps}", rows, ["side", "pages/s", "s a page", "ratio", "peak RSS", "target"])
    differ = "" if same_d == same_i else f"; docling: {same_d[:80]!r}, ours: {same_i[:80]!r}"
    print(f"same DocTags for page 1 at batch 1: {'yes' if same_d == same_i else 'no'} ({len(same_i)} characters"
          f"{differ})", flush=True)
    c.footer()
    return 0


def render_png(pdf: str, path: str, side: int) -> None:
    import pymupdf

    with pymupdf.open(pdf) as doc:
        page = doc[0]
        scale = side / max(page.rect.width, page.rect.height)
        pix = page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
        pix.set_dpi(72, 72)  # docling sizes an image page by its dpi: at 72, scale 1.0 hands it the very pixels
        pix.save(path)


def version(python: str) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('docling'))"],
                         capture_output=True, text=True, env=c.env())
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
