"""Draw docs/ask.svg, the README's picture: a real `idefics ask` on the tiny random model, its answer streaming.

    python docs/picture.py [--model DIR] [--out docs/ask.svg]

The answer is what the model streamed in this run, through the library's `ask` (the command's own code path:
`idefics ask` prints the same pieces). Rich records the terminal (`Console(record=True)`) and exports an SVG; each
streamed piece gets its own (imperceptibly different) colour, hence its own CSS class, which a CSS animation shows
in turn at a fixed pace of PACE seconds a piece, so the SVG replays the streaming. Without `--model` the tiny
model is built in a temporary folder first (needs idefics-cli[tiny]). Never edit the SVG by hand: run this.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = "samples/invoice.pdf"
QUESTION = "What is the total amount due?"
TOKENS = 48  # as README command 1
WIDTH = 80
PACE = 0.08  # seconds between pieces in the replay
START = 1.0  # seconds before the first piece (the command line is shown at once)


def piece_colour(k: int) -> str:
    """A distinct colour for piece k, all of them within a few units of light grey."""
    return f"#{0xd0 + k % 16:02x}{0xd0 + k // 16 % 16:02x}{0xd0 + k // 256 % 16:02x}"


def record(model: str) -> tuple[str, str]:
    """Run the ask and return (the SVG of the terminal, the answer as streamed)."""
    from rich.console import Console
    from rich.text import Text

    import idefics_cli

    engine = idefics_cli.load(model, device="cpu", max_new_tokens=TOKENS)
    answer = engine.ask(os.path.join(ROOT, DOC), QUESTION)
    console = Console(record=True, width=WIDTH, file=sys.stderr, force_terminal=True, color_system="truecolor")
    console.print(f'$ idefics ask {DOC} "{QUESTION}" \\\n    --model /tmp/idefics-tiny --max-new-tokens {TOKENS}',
                  style="bold", highlight=False, markup=False)
    text, pieces = Text(), []
    for piece in answer:  # as it streams; drawn once it has all come, wrapped as a terminal wraps it
        text.append(piece, style=piece_colour(len(pieces)))
        pieces.append(piece)
    console.print(text, highlight=False)
    console.print("$", style="bold")
    return animate(console.export_svg(title="idefics ask"), len(pieces)), "".join(pieces)


def animate(svg: str, count: int) -> str:
    """Hide each piece's class until its turn (CSS in the SVG's own style block)."""
    classes = dict(re.findall(r"\.(terminal-\d+-r\d+) \{ fill: (#[0-9a-f]{6})", svg))
    by_colour = {colour: name for name, colour in classes.items()}
    rules = ["@keyframes idefics-show { to { opacity: 1 } }"]
    for k in range(count):
        name = by_colour.get(piece_colour(k))
        if name:  # a piece of only spaces or newlines draws no text
            delay = START + k * PACE
            rules.append(f".{name} {{ opacity: 0; animation: idefics-show 0s linear {delay:.2f}s forwards }}")
    return svg.replace("</style>", "\n".join(rules) + "\n    </style>", 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a tiny model folder (default: build one in a temporary folder)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "ask.svg"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from idefics_cli.dev.tiny import build

            model = build(os.path.join(tmp, "idefics-tiny"), size="tiny", seed=0)
        svg, answer = record(model)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(svg)
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
