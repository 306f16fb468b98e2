"""P3: `idefics transcribe` of a 24-page PDF against a plain per-page loop, in pages/s (target >= 2.5x).

    python bench/transcribe.py [--reps N] [--pages 24] [--max-new-tokens 64] [--batch-size auto]
                               [--layout portrait|mixed|varied] [--invariant] [--smoke]

Both sides are fresh processes on the same random mid-size Idefics2 (4-bit nf4, CPU, float32 compute).
The plain loop (bench/plain.py loop) renders, preprocesses and generates one page at a time; its pages/s
are over that loop. The CLI's pages/s are its own summary line's (from the first page queued to the last
record written), so both exclude imports and model loading; the wall time of each whole process is shown
too. Each run reports how many pages' texts are identical to the plain loop's (the least over the runs):
a batch of 8 rounds differently from a batch of 1 in float32, so greedy texts can part at a near-tie.
A "model only" side (bench/stages.py model-only) renders and preprocesses the same pages beforehand and times
only the engine's batched generate at the same batch size: the CLI's pages/s against it (target >= 0.95x) says
how much of rendering, preprocessing and I/O the pipeline hides behind the model.
`--invariant` adds a further side, the CLI at `--batch-size 1` (batch-invariant: every page alone, as the plain
loop), to measure what bit-stable output costs against the batched default.
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
    p.add_argument("--layout", default="portrait", choices=["portrait", "mixed", "varied"], help="page sizes")
    p.add_argument("--invariant", action="store_true", help="also run the CLI at --batch-size 1")
    args = p.parse_args(argv)
    reps, pages = (1, 2) if args.smoke else (args.reps, args.pages)
    args.invariant = args.invariant or args.smoke
    n = str(8 if args.smoke else args.max_new_tokens)
    c.header("P3 idefics transcribe", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), pages, args.layout)
        plain = [sys.executable, os.path.join(c.HERE, "plain.py"), "loop", model, pdf, c.TRANSCRIBE_PROMPT,
                 "--max-new-tokens", n]
        out = os.path.join(tmp, "records.jsonl")

        def cli(batch_size):
            return [*c.idefics_cmd(), "transcribe", pdf, "--out", out, "--force", "--prompt", c.TRANSCRIBE_PROMPT,
                    "--model", model, "--quant", "4bit", "--device", "cpu", "--max-new-tokens", n,
                    "--batch-size", batch_size]

        model_only = [sys.executable, os.path.join(c.HERE, "stages.py"), "model-only", model, pdf,
                      c.TRANSCRIBE_PROMPT, "--max-new-tokens", n, "--batch-size", args.batch_size]

        def run_model_only():
            r = c.run(model_only)
            result = json.loads(r.stdout)
            return r.wall, pages / result["seconds"], result["texts"]

        def run_plain():
            r = c.run(plain)
            result = json.loads(r.stdout)
            return r.wall, pages / result["seconds"], result["texts"]

        def run_cli(batch_size):
            def go():
                if os.path.exists(out):
                    os.remove(out)
                r = c.run(cli(batch_size))
                match = SUMMARY.search(r.stderr)
                if not match or int(match.group(1)) != pages:
                    raise SystemExit(f"no summary for {pages} pages in the CLI's stderr:\n{r.stderr[-2000:]}")
                with open(out) as f:
                    records = sorted((json.loads(line) for line in f), key=lambda rec: rec["page"])
                return r.wall, pages / float(match.group(2)), [rec["text"] for rec in records]
            return go

        sides = {"plain": run_plain, "model": run_model_only, "cli": run_cli(args.batch_size)}
        if args.invariant:
            sides["cli1"] = run_cli("1")
        runs = c.interleave(sides, reps)
    reference = runs["plain"][0][2]
    identical = {name: min(sum(a == b for a, b in zip(texts, reference)) for _, _, texts in side)
                 for name, side in runs.items()}
    fig = {name: (c.median(w for w, _, _ in side), c.median(r for _, r, _ in side)) for name, side in runs.items()}
    labels = {"model": f"model only (engine's batched generate, --batch-size {args.batch_size})",
              "cli": f"idefics transcribe (--batch-size {args.batch_size})", "cli1": "idefics transcribe "
              "(--batch-size 1, batch-invariant)"}
    rows = [["plain per-page loop (baseline)", f"{fig['plain'][1]:.3f}", "1.00x", f"{fig['plain'][0]:.1f} s",
             "1.00x", f"{identical['plain']}/{pages}", ""]]
    for name in [k for k in ("model", "cli", "cli1") if k in runs]:
        ratio = fig[name][1] / fig["plain"][1]
        rows.append([labels[name], f"{fig[name][1]:.3f}", f"{ratio:.2f}x", f"{fig[name][0]:.1f} s",
                     f"{fig['plain'][0] / fig[name][0]:.2f}x", f"{identical[name]}/{pages}",
                     c.verdict(ratio, 2.5, at_most=False) if name == "cli" else ""])
    c.table(f"P3 {pages}-page PDF ({args.layout}), {n} new tokens a page, median of {reps} runs each; "
            f"pages identical to the plain loop: {identical['cli']}/{pages}", rows,
            ["command", "pages/s", "speed-up", "process wall", "wall speed-up", "identical pages", "target"])
    hidden = fig["cli"][1] / fig["model"][1]
    print(f"idefics transcribe pages/s = {hidden:.3f}x of model-only: {c.verdict(hidden, 0.95, at_most=False)}",
          flush=True)
    if "cli1" in runs:
        print(f"batch-invariant --batch-size 1 costs {fig['cli'][1] / fig['cli1'][1]:.2f}x the time a page of the "
              f"batched default here", flush=True)
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
