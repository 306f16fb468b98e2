"""P4: peak RSS of `idefics transcribe` over a large PDF against the same over a small one (target <= 1.15x).

    python bench/memory.py [--reps N] [--small 30] [--large 300] [--layout portrait|mixed|varied]
                           [--target 1.15] [--max-new-tokens 8] [--smoke]

The extended P4 runs `--small 300 --large 1200 --layout varied --target 1.10`: pages of six sizes (US letter,
A4 and legal, portrait and landscape), as in real mixed documents.
Both are fresh processes on the same random mid-size Idefics2 (4-bit nf4, CPU) with the default batch
size; the peak resident set size of each child comes from wait4(). Memory flat in the number of pages
means the ratio stays near 1. Few new tokens a page keep the 300-page run short: rendering, the prefetch
queue, preprocessing and the records are what could grow with the page count.
"""

from __future__ import annotations

import os
import sys
import tempfile

import common as c


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=1)
    p.add_argument("--small", type=int, default=30)
    p.add_argument("--large", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--layout", default="portrait", choices=["portrait", "mixed", "varied"], help="page sizes")
    p.add_argument("--target", type=float, default=1.15, help="the ratio to meet (default 1.15)")
    args = p.parse_args(argv)
    reps, small, large = (1, 1, 3) if args.smoke else (args.reps, args.small, args.large)
    n = str(4 if args.smoke else args.max_new_tokens)
    c.header("P4 idefics transcribe memory", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdfs = {count: c.make_pdf(os.path.join(tmp, f"doc{count}.pdf"), count, args.layout) for count in (small, large)}

        def side(count):
            def go():
                out = os.path.join(tmp, f"records{count}.jsonl")
                if os.path.exists(out):
                    os.remove(out)
                r = c.run([*c.idefics_cmd(), "transcribe", pdfs[count], "--out", out, "--model", model,
                           "--quant", "4bit", "--device", "cpu", "--max-new-tokens", n, "--quiet"])
                with open(out) as f:
                    ok = sum('"status": "ok"' in line for line in f)
                if ok != count:
                    raise SystemExit(f"{ok} of {count} pages transcribed")
                return r
            return go

        runs = c.interleave({f"{small} pages": side(small), f"{large} pages": side(large)}, reps)
    rss = {name: c.median(r.max_rss_mib for r in side) for name, side in runs.items()}
    wall = {name: c.median(r.wall for r in side) for name, side in runs.items()}
    ratio = rss[f"{large} pages"] / rss[f"{small} pages"]
    c.table(f"P4 peak RSS of idefics transcribe ({args.layout} pages), {n} new tokens a page, median of {reps} "
            f"run(s) each", [
        [f"{small}-page PDF (baseline)", f"{rss[f'{small} pages']:.0f} MiB", "1.00x", f"{wall[f'{small} pages']:.0f} s",
         ""],
        [f"{large}-page PDF", f"{rss[f'{large} pages']:.0f} MiB", f"{ratio:.3f}x", f"{wall[f'{large} pages']:.0f} s",
         c.verdict(ratio, args.target, at_most=True)],
    ], ["input", "peak RSS", "ratio", "wall", "target"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
