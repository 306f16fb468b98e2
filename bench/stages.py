"""Child processes that time the model's stages through idefics-cli's own engine (the driver is elsewhere).

    python bench/stages.py model-only MODEL PDF PROMPT [--batch-size auto|N] [--max-new-tokens N]
        JSON {"seconds", "texts", "batch_size"}: every page rendered and preprocessed first (not timed), then
        only the engine's batched generate (vision tower + connector, prefill, decode) is timed, batch by batch.
    python bench/stages.py decompose MODEL PDF PROMPT [--batch-sizes 1,8] [--max-new-tokens N]
        JSON {"render_s", "preprocess_s", "preprocess_plain_s", "batches": {B: {vision_s, prefill_s,
        decode_token_s, ...}}}: seconds per page to render, to preprocess (idefics-cli's engine.prepare: the
        processor's split and resize into 8-bit images, mapped by its value table in the vision step; and the
        plain loop's whole processor call, on the first 8 pages), and per call of B pages the vision tower +
        connector, the language prefill (the decode loop's `add`: prefill and first token on the image features)
        and one decode step (the loop's steps to T tokens, end of utterance masked, over T - 1), after one untimed
        warm-up page.

Both load the model with `idefics_cli.runtime.model.load_engine` (4-bit nf4, CPU, float32 compute), as
`transcribe` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _load(model_dir: str, quant: str = "4bit"):
    from idefics_cli.runtime.model import ModelOptions, load_engine

    return load_engine(ModelOptions(model=model_dir, quant=quant, device="cpu", offline=True))


def _pages(pdf: str, side: int | None = None) -> tuple[list, float]:
    """Every page of `pdf` rendered as `transcribe` renders it (`side`: the model's render size); seconds a page."""
    from idefics_cli.documents import open_document

    with open_document(pdf, longest_side=side) as doc:
        start = time.perf_counter()
        images = [doc.render(p) for p in range(1, doc.page_count + 1)]
    return images, (time.perf_counter() - start) / len(images)


def model_only(args) -> None:
    engine = _load(args.model, args.quant)
    size = engine.auto_batch_size() if args.batch_size == "auto" else int(args.batch_size)
    images, _ = _pages(args.pdf, engine.render_side)
    batches = [engine.prepare([([im], args.question) for im in images[k:k + size]], collect=True)
               for k in range(0, len(images), size)]
    images = None
    texts = []
    start = time.perf_counter()
    for k in range(len(batches)):
        texts += [g.text for g in engine.generate_batch(batches[k], args.max_new_tokens)]
        batches[k] = None
    print(json.dumps({"seconds": time.perf_counter() - start, "texts": texts, "batch_size": size}))


def _sync(engine) -> None:
    if engine.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def decompose_engine(engine, images: list, question: str, tokens: int, sizes: list[int]) -> dict:
    """Stage times over `images` (rendered pages) at each batch size in `sizes`; see the module docstring."""
    from idefics_cli.runtime.decode import Loop, Row

    out: dict = {"tokens": tokens, "batches": {}}
    engine.generate(engine.prepare([([images[0]], question)], collect=True), 2)  # warm-up
    pre = []
    for size in sizes:
        rows: dict[str, list] = {"vision_s": [], "prefill_s": [], "decode_token_s": []}
        for k in range(0, len(images) - size + 1, size):
            batch = [([im], question) for im in images[k:k + size]]
            t0 = time.perf_counter()
            inputs = engine.prepare(batch, collect=True)
            pre.append((time.perf_counter() - t0) / size)
            _sync(engine)
            t0 = time.perf_counter()
            features = engine.features(inputs)
            _sync(engine)
            rows["vision_s"].append(time.perf_counter() - t0)
            ids = [inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in range(size)]
            loop = Loop(engine)
            loop.suppressed = [*loop.suppressed, *loop.eos]  # every row runs its T tokens
            t0 = time.perf_counter()
            loop.add([Row(i, f, max_tokens=tokens) for i, f in zip(ids, features)])
            _sync(engine)
            rows["prefill_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            while loop.rows:
                loop.step()
            _sync(engine)
            rows["decode_token_s"].append((time.perf_counter() - t0) / (tokens - 1))
        out["batches"][str(size)] = {name: statistics.median(v) for name, v in rows.items()}
        out["batches"][str(size)]["calls"] = len(rows["vision_s"])
        out["batches"][str(size)]["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    out["preprocess_s"] = statistics.median(pre)
    image_processor, plain = engine.processor.image_processor, []
    for im in images[:8]:  # the plain loop's preprocessing: the processor's whole call (padded, with its mask)
        t0 = time.perf_counter()
        image_processor([[im]])
        plain.append(time.perf_counter() - t0)
    out["preprocess_plain_s"] = statistics.median(plain)
    return out


def decompose(args) -> None:
    engine = _load(args.model)
    images, render_s = _pages(args.pdf)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(json.dumps({"render_s": render_s, **decompose_engine(engine, images, args.question, args.max_new_tokens,
                                                               sizes)}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["model-only", "decompose"])
    p.add_argument("model")
    p.add_argument("pdf")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--quant", default="4bit", help="model-only: the model options' --quant (default 4bit)")
    args = p.parse_args(argv)
    from idefics_cli.process import quiet_loaded

    quiet_loaded()
    (model_only if args.mode == "model-only" else decompose)(args)


if __name__ == "__main__":
    sys.exit(main())
