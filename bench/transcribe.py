"""P3: `idefics transcribe` of a 24-page PDF against a plain per-page loop, in pages/s (target >= 2.5x).

    python bench/transcribe.py [--reps N] [--pages 24] [--max-new-tokens 64] [--batch-size auto] [--smoke]

Both sides are fresh processes on the same random mid-size Idefics2 (4-bit nf4, CPU, float32 compute).
The plain loop (bench/plain.py loop) renders, preprocesses and generates one page at a time; its pages/s
are over that loop. The CLI's pages/s are its own summary line's (from the first page queued to the last
record written), so both exclude imports and model loading; the wall time of each whole process is shown
too. Every page's text must be identical on both sides.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import common as c

SUMMARY = re.compile(r"(\d+) pages transcribed, .* in ([\d.]+)s \(([\d.]+) pages/s\)")


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--pages", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", default="auto", help="the CLI's --batch-size (default auto)")
    args = p.parse_args(argv)
    reps, pages = (1, 2) if args.smoke else (args.reps, args.pages)
    n = str(8 if args.smoke else args.max_new_tokens)
    c.header("P3 idefics transcribe", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), pages)
        plain = [sys.executable, os.path.join(c.HERE, "plain.py"), "loop", model, pdf, c.TRANSCRIBE_PROMPT,
                 "--max-new-tokens", n]
        out = os.path.join(tmp, "records.jsonl")
        cli = [*c.idefics_cmd(), "transcribe", pdf, "--out", out, "--force", "--prompt", c.TRANSCRIBE_PROMPT,
               "--model", model, "--device", "cpu", "--max-new-tokens", n, "--batch-size", args.batch_size]

        def run_plain():
            r = c.run(plain)
            result = json.loads(r.stdout)
            return r.wall, pages / result["seconds"], result["texts"]

        def run_cli():
            if os.path.exists(out):
                os.remove(out)
            r = c.run(cli)
            match = SUMMARY.search(r.stderr)
            if not match or int(match.group(1)) != pages:
                raise SystemExit(f"no summary for {pages} pages in the CLI's stderr:\n{r.stderr[-2000:]}")
            with open(out) as f:
                records = sorted((json.loads(line) for line in f), key=lambda rec: rec["page"])
            return r.wall, pages / float(match.group(2)), [rec["text"] for rec in records]

        runs = c.interleave({"plain": run_plain, "cli": run_cli}, reps)
    texts = {json.dumps(texts) for side in runs.values() for _, _, texts in side}
    same = len(texts) == 1
    fig = {name: (c.median(w for w, _, _ in side), c.median(r for _, r, _ in side)) for name, side in runs.items()}
    ratio = fig["cli"][1] / fig["plain"][1]
    wall_ratio = fig["plain"][0] / fig["cli"][0]
    c.table(f"P3 {pages}-page PDF, {n} new tokens a page, median of {reps} runs each; "
            f"texts identical: {'yes' if same else 'NO'}", [
                ["plain per-page loop (baseline)", f"{fig['plain'][1]:.3f}", "1.00x", f"{fig['plain'][0]:.1f} s",
                 "1.00x", ""],
                [f"idefics transcribe (--batch-size {args.batch_size})", f"{fig['cli'][1]:.3f}", f"{ratio:.2f}x",
                 f"{fig['cli'][0]:.1f} s", f"{wall_ratio:.2f}x", c.verdict(ratio, 2.5, at_most=False)],
            ], ["command", "pages/s", "speed-up", "process wall", "wall speed-up", "target"])
    if not same:
        print("the texts differ between the plain loop and the CLI", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
