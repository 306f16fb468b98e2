"""P13: continuous batching against fixed batches of 8, in the one decode loop (target >= 1.3x pages/s).

    python bench/continuous.py [--reps N] [--smoke] [--model DIR]

One child process loads the random mid-size Idefics2 (4-bit nf4, CPU, float32 compute) and encodes 16 page
images once (the vision tower is the same work on both sides, so it is left out). Half of the pages stop after
8 new tokens and half after 64 (per-row limits, alternating), in batches of pages 1-8, then 9-16, or continuous:
up to 8 rows at once, a page joining as soon as a row ends. Fixed batches are what `transcribe` did before the loop
(transformers' `generate`: every row of a batch decodes until its longest row ends); "fixed, rows leave" is the
same batches with finished rows leaving, the half of continuous batching that needs no joining. All run the same
rows through runtime/decode.py (prefill included), interleaved; pages/s = 16 / wall time, median of --reps.
The time inside `Loop.add` (the prompts' prefills, the same work on both sides) is also reported, and the ratio
of what is left (the steps). Last line: `P13 <ratio>x` (continuous against fixed batches, prefill included).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import common as c

PAGES, WIDTH, SHORT, LONG = 16, 8, 8, 64


def child(model: str, image: str, reps: int, pages: int, short: int, long: int) -> dict:
    from PIL import Image

    from idefics_cli.process import quiet_loaded
    from idefics_cli.runtime.decode import Loop, Row, run_rows
    from idefics_cli.runtime.model import ModelOptions, load_engine

    quiet_loaded()
    engine = load_engine(ModelOptions(model=model, quant="4bit", device="cpu"))
    page = Image.open(image).convert("RGB")
    prompts = []
    for k in range(pages):  # one page image each, cropped differently so that no two prompts are the same
        crop = page.crop((k, k, page.width - k, page.height - k))
        (row,) = engine.rows(engine.prepare([([crop], c.TRANSCRIBE_PROMPT)]))
        prompts.append((row.ids, row.features))
    limits = [short if k % 2 == 0 else long for k in range(pages)]

    class Timed(Loop):  # the loop, timing its prefills (add) apart from its steps
        prefill_s = 0.0

        def add(self, rows):
            start = time.perf_counter()
            try:
                return super().add(rows)
            finally:
                Timed.prefill_s += time.perf_counter() - start

    def rows():
        return [Row(ids, features, max_tokens=n, tag=k) for k, ((ids, features), n) in enumerate(zip(prompts, limits))]

    def fixed(stay: bool) -> dict:
        Timed.prefill_s = 0.0
        start, steps, done = time.perf_counter(), 0, []
        todo = rows()
        for at in range(0, len(todo), WIDTH):
            batch = todo[at:at + WIDTH]
            if stay:  # as transformers' generate did: every row decodes until the batch's longest one ends
                for row in batch:
                    row.max_tokens = max(r.max_tokens for r in batch)
            loop = Timed(engine)
            done += list(run_rows(loop, batch, WIDTH))
            steps += loop.steps
        return {"s": time.perf_counter() - start, "steps": steps, "tokens": sum(len(r.token_ids) for r in done),
                "prefill_s": Timed.prefill_s}

    def continuous() -> dict:
        Timed.prefill_s = 0.0
        start, loop = time.perf_counter(), Timed(engine)
        done = list(run_rows(loop, rows(), WIDTH))
        return {"s": time.perf_counter() - start, "steps": loop.steps, "tokens": sum(len(r.token_ids) for r in done),
                "prefill_s": Timed.prefill_s}

    continuous()  # warm-up
    return c.interleave({"fixed batches of 8": lambda: fixed(True), "fixed, rows leave": lambda: fixed(False),
                         "continuous": continuous}, reps)


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    args = c.parse_or_child(p, argv, child)
    if args is None:
        return 0
    reps = 1 if args.smoke else args.reps
    c.header("P13 continuous batching", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    pages, short, long = (4, 2, 6) if args.smoke else (PAGES, SHORT, LONG)
    with tempfile.TemporaryDirectory() as tmp:
        image = c.make_page_image(os.path.join(tmp, "page.png"))
        spec = {"model": model, "image": image, "reps": reps, "pages": pages, "short": short, "long": long}
        data = c.in_child(__file__, spec)
    rows, rate, stepping = [], {}, {}
    for side, runs in data.items():
        rate[side] = pages / c.median(r["s"] for r in runs)
        stepping[side] = c.median(r["s"] - r["prefill_s"] for r in runs)
        rows.append([side, c.fmt(c.median(r["s"] for r in runs), " s"), c.fmt(rate[side], " pages/s"),
                     c.fmt(c.median(r["prefill_s"] for r in runs), " s"), c.fmt(stepping[side], " s"),
                     runs[0]["steps"], runs[0]["tokens"]])
    ratio = rate["continuous"] / rate["fixed batches of 8"]
    leave = rate["continuous"] / rate["fixed, rows leave"]
    c.table(f"P13 {pages} pages, half stopping after {short} new tokens and half after {long} (median of {reps})",
            rows, ["decode loop", "time", "pages/s", "of it prefill", "of it steps", "steps", "tokens"])
    print(f"# continuous vs fixed batches: {ratio:.3f}x, {c.verdict(ratio, 1.3, at_most=False)}; "
          f"vs fixed batches whose finished rows leave: {leave:.3f}x")
    print(f"# the steps alone (time less prefill): continuous vs fixed batches "
          f"{stepping['fixed batches of 8'] / stepping['continuous']:.3f}x")
    c.footer()
    print(f"P13 {ratio:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
