"""P7: peak RSS of `idefics ask` over many pages: 24 pages against 2, and 24 mixed-orientation against 24 portrait.

    python bench/pages.py [--reps N] [--pages 24] [--max-new-tokens 4] [--smoke] [--model DIR]

Targets: 24 pages <= 1.3x the peak of 2 pages (the pixels of a whole document are never held at once: the
vision tower runs over bounded chunks, each page's pixels built just before its chunk); 24 pages alternating
portrait and landscape <= 1.1x 24 portrait pages (no image is padded to another one's shape). Every side
is a fresh process on the same random mid-size Idefics2 (4-bit nf4, CPU), interleaved; peak RSS comes from
wait4(); the answer is a few tokens, since what is measured is the prompt's images.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import common as c


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=1)
    p.add_argument("--pages", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=4)
    args = p.parse_args(argv)
    reps, pages = (1, 4) if args.smoke else (args.reps, args.pages)
    few = 2
    c.header("P7 idefics ask over many pages", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdfs = {layout: c.make_pdf(os.path.join(tmp, f"{layout}.pdf"), pages, layout)
                for layout in ("portrait", "mixed")}

        def side(layout, count):
            def go():
                r = c.run([*c.idefics_cmd(), "ask", pdfs[layout], "--pages", f"1-{count}", c.QUESTION, "--json",
                           "--model", model, "--quant", "4bit", "--device", "cpu", "--max-new-tokens",
                           str(args.max_new_tokens)])
                answer = json.loads(r.stdout)
                if sum(len(s["pages"]) for s in answer["sources"]) != count:
                    raise SystemExit(f"ask saw {answer['sources']}, not {count} pages")
                return r.max_rss_mib, answer["usage"]["image_tokens"], r.wall
            return go

        sides = {"few": side("portrait", few), "portrait": side("portrait", pages), "mixed": side("mixed", pages)}
        runs = c.interleave(sides, reps)
    rss = {k: c.median(m for m, _, _ in v) for k, v in runs.items()}
    wall = {k: c.median(w for _, _, w in v) for k, v in runs.items()}
    tokens = {k: v[0][1] for k, v in runs.items()}
    many, mixed = rss["portrait"] / rss["few"], rss["mixed"] / rss["portrait"]
    c.table(f"P7 peak RSS of idefics ask, {args.max_new_tokens} new tokens, median of {reps} run(s) each", [
        [f"{few} portrait pages (baseline)", tokens["few"], f"{rss['few']:.0f} MiB", "1.00x", f"{wall['few']:.0f} s",
         ""],
        [f"{pages} portrait pages", tokens["portrait"], f"{rss['portrait']:.0f} MiB", f"{many:.3f}x",
         f"{wall['portrait']:.0f} s", c.verdict(many, 1.3, True)],
        [f"{pages} pages, portrait and landscape alternating", tokens["mixed"], f"{rss['mixed']:.0f} MiB",
         f"{mixed:.3f}x of {pages} portrait", f"{wall['mixed']:.0f} s", c.verdict(mixed, 1.1, True)],
    ], ["input", "image tokens", "peak RSS", "ratio", "wall", "target"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
