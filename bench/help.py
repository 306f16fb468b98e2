"""P1: wall time of `idefics --help` against `python -c "import torch, transformers"` (target <= 0.10x).

    python bench/help.py [--reps N] [--smoke]

Both are fresh processes, run alternately; the figure is the ratio of the medians.
"""

from __future__ import annotations

import sys

import common as c


def main(argv=None) -> int:
    args = c.parser(__doc__, reps=11).parse_args(argv)
    reps = 1 if args.smoke else args.reps
    c.header("P1 idefics --help", args)
    cli = [*c.idefics_cmd(), "--help"]
    base = [sys.executable, "-c", "import torch, transformers"]
    c.run(base), c.run(cli)  # warm-up: page cache and bytecode
    runs = c.interleave({"baseline": lambda: c.run(base), "cli": lambda: c.run(cli)}, reps)
    if "Usage" not in runs["cli"][0].stdout:
        raise SystemExit("idefics --help printed no usage")
    b = c.median(r.wall for r in runs["baseline"])
    h = c.median(r.wall for r in runs["cli"])
    ratio = h / b
    c.table(f"P1 `idefics --help` wall time, median of {reps} runs each", [
        ['python -c "import torch, transformers" (baseline)', f"{b:.3f} s", "1.00x", ""],
        ["idefics --help", f"{h:.3f} s", f"{ratio:.3f}x", c.verdict(ratio, 0.10, at_most=True)],
    ], ["command", "wall (median)", "ratio", "target"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
