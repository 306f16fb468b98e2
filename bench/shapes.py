"""P6: `idefics transcribe` of a PDF whose pages alternate portrait and landscape, against all-portrait pages.

    python bench/shapes.py [--reps N] [--pages 24] [--max-new-tokens 16] [--smoke] [--model DIR]

Targets: peak RSS on the mixed PDF <= 1.10x the portrait one's, pages/s >= 0.95x. Both sides are fresh
processes on the same random mid-size Idefics2 (4-bit nf4, CPU) with the default batch size, interleaved;
the same invoice-like pages, only their orientation differs (US letter, 612 x 792 pt or 792 x 612 pt,
rendered at 1960 px on the long side). Without grouping by shape, a batch holding both orientations pads
every image to 980 x 980 px and the vision tower then needs a dense patch mask. pages/s are the CLI's own
summary line's (imports and loading excluded); peak RSS comes from wait4().
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import common as c

SUMMARY = re.compile(r"(\d+) pages transcribed, .* in ([\d.]+)s \(([\d.]+) pages/s\)")


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--pages", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    reps, pages = (1, 4) if args.smoke else (args.reps, args.pages)
    n = str(4 if args.smoke else args.max_new_tokens)
    c.header("P6 idefics transcribe, mixed page shapes", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdfs = {layout: c.make_pdf(os.path.join(tmp, f"{layout}.pdf"), pages, layout)
                for layout in ("portrait", "mixed")}

        def side(layout):
            def go():
                out = os.path.join(tmp, f"{layout}.jsonl")
                if os.path.exists(out):
                    os.remove(out)
                r = c.run([*c.idefics_cmd(), "transcribe", pdfs[layout], "--out", out, "--model", model,
                           "--quant", "4bit", "--device", "cpu", "--max-new-tokens", n])
                match = SUMMARY.search(r.stderr)
                if not match or int(match.group(1)) != pages:
                    raise SystemExit(f"no summary for {pages} pages in the CLI's stderr:\n{r.stderr[-2000:]}")
                return r.max_rss_mib, pages / float(match.group(2))
            return go

        runs = c.interleave({"portrait": side("portrait"), "mixed": side("mixed")}, reps)
    rss = {k: c.median(m for m, _ in v) for k, v in runs.items()}
    pps = {k: c.median(s for _, s in v) for k, v in runs.items()}
    rss_ratio, speed = rss["mixed"] / rss["portrait"], pps["mixed"] / pps["portrait"]
    c.table(f"P6 idefics transcribe, {pages} pages, {n} new tokens a page, median of {reps} run(s) each", [
        [f"{pages} portrait pages (baseline)", f"{rss['portrait']:.0f} MiB", "1.00x", f"{pps['portrait']:.3f}", "1.00x",
         ""],
        [f"{pages} pages, portrait and landscape alternating", f"{rss['mixed']:.0f} MiB", f"{rss_ratio:.3f}x",
         f"{pps['mixed']:.3f}", f"{speed:.3f}x",
         f"RSS {c.verdict(rss_ratio, 1.10, True)}, pages/s {c.verdict(speed, 0.95, False)}"],
    ], ["input", "peak RSS", "RSS ratio", "pages/s", "speed ratio", "target"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
