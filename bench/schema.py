"""P11: decode speed with `--schema` against without, at batch 1 and 8 (target >= 0.90x), and compile time.

    python bench/schema.py [--reps N] [--max-new-tokens 48] [--smoke] [--model DIR]

One child process loads the random mid-size Idefics2 (4-bit nf4, CPU, float32 compute) and, for batch 1 and
batch 8 (the CPU's automatic batch size), decodes greedy answers to the same page image(s) in the decode loop
with and without the invoice schema's grammar on each row (structured.py, llguidance), interleaved (A, B, B, A,
...) so that load from other processes hits both alike. Decode speed = rows x steps / time between the first and
the last decode step (`decode_rate`): it includes the mask work and excludes the prefill (vision and prompt),
which a schema does not change. The constrained rows
answer in the invoice schema (the random model rarely closes its strings, so both sides usually run the
whole budget). The child also times the grammar side: building llguidance's view of the idefics2 tokenizer
(once per process; structured.tokenizer_view), compiling the invoice schema cold (median of 5), and a
second `compiled()` call (the per-process cache).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import common as c

BATCHES = (1, 8)


def decode_rate(engine, batch: list, tokens: int, schema=None, sync=None) -> dict:
    """Rows of `batch` through the decode loop, `schema`'s grammar on each row or none: rows x steps / the time
    between the first and the last decode step (stamped when the first row's next token is chosen), so the
    vision tower and the prefill are left out; `sync` (CUDA's) runs before each stamp."""
    from idefics_cli.runtime.decode import Loop, run_rows

    stamps: list[float] = []

    def clock(input_ids, scores):
        if sync is not None:
            sync()
        stamps.append(time.perf_counter())
        return scores

    rows = engine.rows(engine.prepare(batch), tokens, schema=schema)
    rows[0].processors = [clock]
    loop = Loop(engine)
    list(run_rows(loop, rows, len(rows)))
    steps = len(stamps) - 1
    return {"tokens_per_s": len(rows) * steps / (stamps[-1] - stamps[0]) if steps else 0.0, "steps": steps}


def child(model: str, image: str, reps: int, max_new_tokens: int, batches: list[int]) -> dict:
    from PIL import Image
    from schema_engines import INVOICE_SCHEMA

    from idefics_cli import structured as st
    from idefics_cli import tune_process
    from idefics_cli.runtime.model import ModelOptions, load_engine

    tune_process()  # the commands' process settings (quiet libraries, tuned allocators)
    engine = load_engine(ModelOptions(model=model, quant="4bit", device="cpu", max_new_tokens=max_new_tokens))
    tokenizer = engine.processor.tokenizer
    vocab = engine.model.config.get_text_config().vocab_size
    stops = sorted(engine.eos_ids)
    schema = st.parse_schema(json.dumps(INVOICE_SCHEMA))
    out: dict = {"grammar": {}}

    from idefics_cli import structured as grammar_engine

    t0 = time.perf_counter()
    grammar_engine.tokenizer_view(tokenizer, vocab, stops)
    out["grammar"]["tokenizer_info_s"] = time.perf_counter() - t0
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        grammar_engine.Compiled.of(schema.schema, tokenizer, vocab, stops)  # the view is cached: the grammar alone
        compiles.append(time.perf_counter() - t0)
    out["grammar"]["compile_s"] = statistics.median(compiles)
    st.compiled(schema, tokenizer, vocab, stops)  # fills the cache
    t0 = time.perf_counter()
    st.compiled(schema, tokenizer, vocab, stops)
    out["grammar"]["cached_s"] = time.perf_counter() - t0

    page = Image.open(image).convert("RGB")
    question = st.with_schema("Extract the invoice fields.", schema)

    def run(batch: int, constrained: bool) -> dict:
        return decode_rate(engine, [([page], question)] * batch, max_new_tokens, schema if constrained else None)

    run(1, True)  # warm-up: first decode, first grammar use
    for batch in batches:
        sides = {"plain": lambda b=batch: run(b, False), "schema": lambda b=batch: run(b, True)}
        out[str(batch)] = c.interleave(sides, reps)
    return out


def main(argv=None) -> int:
    front = c.decode_bench(__file__, __doc__, "P11 --schema decode speed", child, argv, reps=3, batches=BATCHES)
    if front is None:
        return 0
    reps, batches, tokens, data = front
    rows = []
    for batch in batches:
        runs = data[str(batch)]
        plain = c.median(r["tokens_per_s"] for r in runs["plain"])
        schema = c.median(r["tokens_per_s"] for r in runs["schema"])
        steps = min(r["steps"] for side in runs.values() for r in side)
        ratio = schema / plain
        rows.append([batch, c.fmt(plain, " tok/s"), c.fmt(schema, " tok/s"), f"{ratio:.3f}x",
                     c.verdict(ratio, 0.90, at_most=False), steps])
    c.table(f"P11 decode with the invoice schema vs without ({tokens} new tokens, median of {reps})", rows,
            ["batch", "without", "with --schema", "ratio", "target", "fewest steps"])
    g = data["grammar"]
    c.table("P11 grammar (llguidance, idefics2 tokenizer)", [
        ["tokenizer view (once per process)", c.fmt(g["tokenizer_info_s"] * 1000, " ms")],
        ["compile the invoice schema (cold, median of 5)", c.fmt(g["compile_s"] * 1000, " ms")],
        ["compiled() again (per-process cache)", c.fmt(g["cached_s"] * 1000, " ms")]], ["step", "time"])
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
