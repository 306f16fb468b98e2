"""P16: decode speed with the per-token confidence against without, at batch 1 and 8 (target >= 0.98x).

    python bench/confidence.py [--reps N] [--max-new-tokens 48] [--smoke] [--model DIR]

Confidence is always computed (runtime/decode.py: one logsumexp and one gather a step for the whole batch, the
values appended to each row); the baseline is the same loop with that code path off (`Loop._confidence = False`,
a private switch only this benchmark uses). One child process loads the random mid-size Idefics2 (4-bit nf4,
CPU, float32 compute) and decodes greedy answers to the same page image(s), with and without, interleaved (A, B,
B, A, ...). Decode speed = rows x steps / time between the first and the last decode step (bench/schema.py's
`decode_rate`: the prefill is left out, and confidence costs nothing there but one gather). Medians of --reps.
Last line: `P16 <ratio>x`, the lower of the two batches' ratios.
"""

from __future__ import annotations

import sys

import common as c

BATCHES = (1, 8)


def child(model: str, image: str, reps: int, max_new_tokens: int, batches: list[int]) -> dict:
    from PIL import Image
    from schema import decode_rate

    from idefics_cli import tune_process
    from idefics_cli.runtime.decode import Loop
    from idefics_cli.runtime.model import ModelOptions, load_engine

    tune_process()
    engine = load_engine(ModelOptions(model=model, device="cpu", max_new_tokens=max_new_tokens))
    page = Image.open(image).convert("RGB")

    def run(batch: int, confidence: bool) -> dict:
        Loop._confidence = confidence
        try:
            return decode_rate(engine, [([page], "Transcribe this page.")] * batch, max_new_tokens)
        finally:
            Loop._confidence = True

    run(1, True)  # warm-up
    out = {}
    for batch in batches:
        out[str(batch)] = c.interleave({"without": lambda b=batch: run(b, False),
                                        "with": lambda b=batch: run(b, True)}, reps)
    return out


def main(argv=None) -> int:
    front = c.decode_bench(__file__, __doc__, "P16 confidence decode speed", child, argv, reps=5, batches=BATCHES)
    if front is None:
        return 0
    reps, batches, tokens, data = front
    rows, ratios = [], []
    for batch in batches:
        runs = data[str(batch)]
        without = c.median(r["tokens_per_s"] for r in runs["without"])
        with_ = c.median(r["tokens_per_s"] for r in runs["with"])
        ratios.append(with_ / without)
        rows.append([batch, c.fmt(without, " tok/s"), c.fmt(with_, " tok/s"), f"{ratios[-1]:.3f}x",
                     c.verdict(ratios[-1], 0.98, at_most=False), min(r["steps"] for s in runs.values() for r in s)])
    c.table(f"P16 decode with confidence vs without ({tokens} new tokens, median of {reps})", rows,
            ["batch", "without", "with confidence", "ratio", "target", "fewest steps"])
    c.footer()
    print(f"P16 {min(ratios):.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
