"""P2: `idefics ask` on one page image against the model card's plain script (target <= 1.0x, never slower).

    python bench/ask.py [--reps N] [--max-new-tokens 64] [--smoke] [--model DIR]

Both sides are fresh processes on the same random mid-size Idefics2 (4-bit nf4, CPU, float32 compute) and
the same 1515 x 1960 px page image: wall time from spawn to exit, and time to first token = from spawn to
the first byte of the answer on stdout (the plain script streams each piece as soon as it is decoded).
The answers must be identical.
"""

from __future__ import annotations

import os
import sys
import tempfile

import common as c


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    reps = 1 if args.smoke else args.reps
    c.header("P2 idefics ask", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        image = c.make_page_image(os.path.join(tmp, "page.png"))
        n = str(8 if args.smoke else args.max_new_tokens)
        plain = [sys.executable, os.path.join(c.HERE, "plain.py"), "ask", model, image, c.QUESTION,
                 "--max-new-tokens", n]
        cli = [*c.idefics_cmd(), "ask", image, c.QUESTION, "--model", model, "--quant", "4bit", "--device", "cpu",
               "--max-new-tokens", n]
        runs = c.interleave({"plain": lambda: c.run(plain), "cli": lambda: c.run(cli)}, reps)
    answers = {r.stdout.strip() for side in runs.values() for r in side}
    same = len(answers) == 1
    rows = []
    figures = {}
    for name, label in (("plain", "model card's plain script (baseline)"), ("cli", "idefics ask")):
        wall = c.median(r.wall for r in runs[name])
        ttft = c.median(r.first_byte for r in runs[name])
        figures[name] = (wall, ttft)
        rows.append([label, f"{wall:.2f} s", f"{ttft:.2f} s"])
    wall_ratio = figures["cli"][0] / figures["plain"][0]
    ttft_ratio = figures["cli"][1] / figures["plain"][1]
    rows[0] += ["1.00x", "1.00x", ""]
    rows[1] += [f"{wall_ratio:.3f}x", f"{ttft_ratio:.3f}x",
                f"wall {c.verdict(wall_ratio, 1.0, True)}, first token {c.verdict(ttft_ratio, 1.0, True)}"]
    c.table(f"P2 one page image, {n} new tokens, median of {reps} runs each; answers identical: "
            f"{'yes' if same else 'NO'}", rows,
            ["command", "wall", "first token", "wall ratio", "first-token ratio", "target"])
    if not same:
        print("answers differ:\n" + "\n---\n".join(sorted(answers)), file=sys.stderr)
        return 1
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
