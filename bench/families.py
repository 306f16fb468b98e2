"""P14: `idefics transcribe` on SmolVLM-256M's exact shapes against a plain transformers loop, in pages/s.

    python bench/families.py [--reps N] [--pages 4] [--max-new-tokens 1024] [--batch-size auto] [--smoke]

The model is a random Idefics3 of SmolVLM-256M-Instruct's real sizes (tiny.py `--family idefics3 --size
smolvlm-256m`: 512-px tiles, 64 tokens a tile, SmolLM2-135M's text model), float32 on the CPU, unquantized (what
`--quant auto` picks below 4B). The pages are samples/report.pdf's four (A4), rendered to the processor's
longest_edge, 2048 px (4 x 3 tiles + the global image: 832 visual tokens a page). Sides, interleaved:
- plain: the model card's code one page at a time (bench/plain.py loop --quant none --side 2048);
- model: bench/stages.py model-only (pages rendered and preprocessed first; only the engine's batched generate);
- cli: `idefics transcribe` (its own summary line's pages/s).
Targets: cli >= 1.8x plain, cli >= 0.95x model. A random model never stops early, so every page gets
--max-new-tokens tokens. `--smoke`: the tiny Idefics3, 2 pages, 8 tokens, one run of each side.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import common as c

SUMMARY = re.compile(r"(\d+) pages transcribed, .* in ([\d.]+)s \(([\d.]+) pages/s\)")
SIDE = 2048  # SmolVLM's size.longest_edge: what `transcribe` renders its pages to


def sample_pages(path: str, pages: int) -> str:
    """The first `pages` pages of samples/report.pdf (repeated if it has fewer), as one PDF."""
    import pymupdf

    out = pymupdf.open()
    with pymupdf.open(os.path.join(c.ROOT, "samples", "report.pdf")) as src:
        while out.page_count < pages:
            out.insert_pdf(src, to_page=min(src.page_count, pages - out.page_count) - 1)
    out.save(path)
    out.close()
    return path


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=1)
    p.add_argument("--pages", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", default="auto", help="the CLI's --batch-size (default auto: 8 on the CPU)")
    args = p.parse_args(argv)
    reps, pages = (1, 2) if args.smoke else (args.reps, args.pages)
    n = str(8 if args.smoke else args.max_new_tokens)
    c.header("P14 SmolVLM-256M shapes", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "smolvlm-256m", family="idefics3")
    with tempfile.TemporaryDirectory() as tmp:
        pdf = sample_pages(os.path.join(tmp, "pages.pdf"), pages)
        out = os.path.join(tmp, "records.jsonl")
        plain = [sys.executable, os.path.join(c.HERE, "plain.py"), "loop", model, pdf, c.TRANSCRIBE_PROMPT,
                 "--max-new-tokens", n, "--quant", "none", "--side", str(SIDE)]
        model_only = [sys.executable, os.path.join(c.HERE, "stages.py"), "model-only", model, pdf,
                      c.TRANSCRIBE_PROMPT, "--max-new-tokens", n, "--batch-size", args.batch_size, "--quant", "auto"]
        cli = [*c.idefics_cmd(), "transcribe", pdf, "--out", out, "--force", "--prompt", c.TRANSCRIBE_PROMPT,
               "--model", model, "--device", "cpu", "--max-new-tokens", n, "--batch-size", args.batch_size]

        def timed(cmd):
            def go():
                r = c.run(cmd)
                result = json.loads(r.stdout)
                return r.wall, pages / result["seconds"], r.max_rss_mib
            return go

        def run_cli():
            if os.path.exists(out):
                os.remove(out)
            r = c.run(cli)
            match = SUMMARY.search(r.stderr)
            if not match or int(match.group(1)) != pages:
                raise SystemExit(f"no summary for {pages} pages in the CLI's stderr:\n{r.stderr[-2000:]}")
            return r.wall, pages / float(match.group(2)), r.max_rss_mib

        runs = c.interleave({"plain": timed(plain), "model": timed(model_only), "cli": run_cli}, reps)
    fig = {name: [c.median(x[k] for x in side) for k in range(3)] for name, side in runs.items()}
    labels = {"plain": "plain per-page loop (model card, baseline)", "model": "model only (engine's batched generate)",
              "cli": f"idefics transcribe (--batch-size {args.batch_size})"}
    rows = []
    for name in ("plain", "model", "cli"):
        wall, rate, rss = fig[name]
        ratio = rate / fig["plain"][1]
        rows.append([labels[name], f"{rate:.4f}", f"{1 / rate:.1f} s", f"{ratio:.2f}x", f"{wall:.1f} s",
                     f"{rss:.0f} MiB", c.verdict(ratio, 1.8, at_most=False) if name == "cli"
                     else ""])
    c.table(f"P14 {pages} pages of samples/report.pdf at {SIDE} px, {n} new tokens a page, median of {reps} runs",
            rows, ["side", "pages/s", "s a page", "vs plain", "process wall", "peak RSS", "target"])
    hidden = fig["cli"][1] / fig["model"][1]
    print(f"idefics transcribe pages/s = {hidden:.3f}x of model-only: {c.verdict(hidden, 0.95, at_most=False)}",
          flush=True)
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
