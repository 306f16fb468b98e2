"""P5 (GPU): first light, then peak VRAM, prefill time, decode tokens/s at batch 1 and pages/min at the auto batch.

    python bench/gpu.py [--max-new-tokens 64] [--ask-pages 25] [--families] [--smoke]

It starts with bench/first_light.py on the tiny model (float32 and bfloat16: ids, pixels and greedy answers equal
to the model card's code on the GPU; ask, transcribe and serve answering) and stops there if that fails.

The full idefics2-8b shape (tiny.SIZES["full"]) with random weights is built directly on the GPU in
bf16 and saved, then loaded through the CLI's own `idefics_cli.runtime.model.load_engine`: in 4-bit (nf4, double quant,
bf16 compute, split on: the user's path) and, as the baseline, in bf16 without quantization. Pages/min
run the CLI's transcription pipeline (prefetch + batches at `LocalEngine.auto_batch_size()`); the model card's
plain snippet (render, processor, generate, one page at a time) runs on the same 4-bit model as the
pages/min baseline. Targets: 4-bit peak VRAM <= 6.0 GiB; 4-bit pages/min >= 2x the snippet's. Without
CUDA it says so and exits 0. Meant to finish in under 6 minutes on one H200 (P8 and P9, last, add 2 to 3).

Then one question over `--ask-pages` pages (25: a report) on the 4-bit model: the CLI's path (the vision
tower over bounded same-shape chunks) against the model card's (one processor call, every image padded into
one `pixel_values`, one `generate`): peak VRAM (weights included; target under 12 GiB, so that a 16 GB card
can do it) and time to first token (from the rendered pages to the first new token), or the plain path's
out-of-memory. `--smoke` without CUDA runs this comparison, on the CPU: 3 small pages, the tiny model.

Then P3's decomposition (bench/decompose.py) on the 4-bit model: seconds per page to render, preprocess, run the
vision tower + connector, prefill and decode, at batch 1 and 8, and the bound on what batching can give.

Then P11 on the 4-bit model (bench/schema.py's measure at this shape): decode tokens/s with the invoice schema's
grammar (`--schema`, structured.py) against without, at batch 1 and 8, interleaved; decode = rows x steps / the
time between the first and the last decode step of runtime/decode.py's loop (with a CUDA sync), so the prefill is
left out. Target: >= 0.90x. `--smoke` without CUDA runs it too (batch 1 and 2, 4 tokens).
Last, bench/serve.py's P8 and P9 through an `idefics serve` child process on the GPU with the same model (4-bit): a
second question over a cached page, time to first token <= 0.15x the first's; 8 one-page requests at once, wall
<= 0.5x the same sent one after another. `--smoke` without CUDA runs them too, on the CPU with the tiny model.
`--families` instead measures the newer members' shapes (FAMILY_SHAPES: Idefics3-8B, SmolVLM-Instruct, SmolVLM-256M,
random weights, bf16, `--quant auto`: nf4 from 4B): peak VRAM, prefill, decode and pages/s through the pipeline.
`--smoke` without CUDA runs `measure` on the CPU for the tiny Idefics2 and the tiny Idefics3 too.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import common as c
import decompose
import first_light
import schema as schema_bench
import serve
import stages


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_page_inputs(engine, pdf):
    from idefics_cli.documents import open_document

    with open_document(pdf, longest_side=engine.render_side) as doc:  # at the family's render size
        image = doc.render(1)
    return engine.build_inputs([([image], c.QUESTION)])


def timed_generate(engine, inputs, new_tokens: int) -> float:
    import torch

    sync(engine.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sync(engine.device)
    return time.perf_counter() - t0


def pipeline_pages_per_min(engine, pdf, pages: int, batch_size: int, new_tokens: int, tmp: str) -> float:
    """The CLI's transcription pipeline (prefetch thread, batches) over `pages` pages, in pages/min."""
    from idefics_cli import Model

    out = os.path.join(tmp, f"records-{time.monotonic_ns()}.jsonl")
    run = Model(engine).transcribe([pdf], out=out, prompt=c.TRANSCRIBE_PROMPT, pages=f"1-{pages}",
                                   batch_size=batch_size, force=True)
    assert engine.options.max_new_tokens == new_tokens  # the engine's own options make the request
    run.run()
    summary = run.summary
    if summary.ok != pages:
        raise SystemExit(f"the pipeline transcribed {summary.ok} of {pages} pages: {summary.failures[:3]}")
    return 60 * pages / summary.seconds


def snippet_pages_per_min(engine, pdf, pages: int, new_tokens: int) -> float:
    """The model card's snippet, one page at a time: render, processor, generate (same loaded model)."""
    import pymupdf
    from PIL import Image

    processor, model = engine.processor, engine.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c.TRANSCRIBE_PROMPT}]}]
    sync(engine.device)
    t0 = time.perf_counter()
    with pymupdf.open(pdf) as doc:
        for k in range(pages):
            page = doc[k]
            scale = 1960 / max(page.rect.width, page.rect.height)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
            image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=prompt, images=[image], return_tensors="pt").to(model.device)
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    sync(engine.device)
    return 60 * pages / (time.perf_counter() - t0)


def ask_pages(engine, pdf: str, pages: int, plain: bool, base: int = 0, dpi: int | None = None) -> dict:
    """One question over `pages` pages, up to its first new token: time, peak memory, that token (or OOM)."""
    import torch

    from idefics_cli.documents import open_document

    with open_document(pdf, dpi=dpi) as doc:
        images = [doc.render(k) for k in range(1, pages + 1)]
    cuda = engine.device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    kwargs = None
    t0 = time.perf_counter()
    try:
        if plain:  # the model card: one processor call (padded pixel_values), generate encodes them all at once
            kwargs = dict(engine.build_inputs([(images, c.QUESTION)]))
            with torch.inference_mode():
                out = engine.model.generate(**kwargs, do_sample=False, max_new_tokens=1, min_new_tokens=1)
            first = out[0, kwargs["input_ids"].shape[1]:].tolist()
        else:  # idefics-cli: vision.py's same-shape chunks, then the decode loop's prefill
            first = engine.generate(engine.prepare([(images, c.QUESTION)]), max_new_tokens=1).token_ids
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        kwargs = None
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True, "peak": torch.cuda.max_memory_allocated() / 2**30}
    ttft = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    kwargs = out = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"oom": False, "ttft": ttft, "peak": peak, "first": first}


def stage_times(engine, pdf: str, pages: int, tokens: int, sizes: list[int], dpi: int | None = None) -> dict:
    """P3's decomposition (bench/decompose.py) on this engine: render, preprocess, vision, prefill, decode."""
    from idefics_cli.documents import open_document

    with open_document(pdf, dpi=dpi) as doc:
        t0 = time.perf_counter()
        images = [doc.render(k) for k in range(1, pages + 1)]
        render_s = (time.perf_counter() - t0) / pages
    return {"render_s": render_s, **stages.decompose_engine(engine, images, c.TRANSCRIBE_PROMPT, tokens, sizes)}


def ask_table(title: str, pages: int, cli: dict, plain: dict) -> None:
    def cells(r):
        if r["oom"]:
            return ["out of memory", f"(at {r['peak']:.2f} GiB)"]
        return [f"{r['ttft']:.2f} s", "" if r["peak"] is None else f"{r['peak']:.2f} GiB"]

    same = not cli["oom"] and not plain["oom"] and cli["first"] == plain["first"]
    c.table(title, [["model card (one processor call, pixel_values)", *cells(plain), ""],
                    ["idefics ask (chunked, same-shape vision calls)", *cells(cli),
                     "" if cli["peak"] is None else f"{'met' if cli['peak'] < 12 else 'NOT met'} (< 12 GiB)"]],
            ["path", "time to first token", "peak VRAM", "target"])
    print(f"first new token identical: {'yes' if same else 'no' if not plain['oom'] else 'n/a (plain OOM)'}; "
          f"{pages} pages", flush=True)


def schema_decode(engine, pdf: str, batches: list[int], tokens: int, reps: int, dpi: int | None = None) -> dict:
    """P11: decode tokens/s with the invoice schema's grammar and without, per batch size (medians, interleaved)."""
    import torch
    from schema_engines import INVOICE_SCHEMA

    from idefics_cli import structured as st
    from idefics_cli.documents import open_document

    schema = st.parse_schema(json.dumps(INVOICE_SCHEMA))
    with open_document(pdf, dpi=dpi) as doc:
        image = doc.render(1)
    question = st.with_schema("Extract the invoice fields.", schema)
    sync = torch.cuda.synchronize if engine.device.startswith("cuda") else None

    def run(batch: int, constrained: bool) -> dict:
        return schema_bench.decode_rate(engine, [([image], question)] * batch, tokens, schema if constrained else None,
                                        sync)

    run(1, True)  # warm-up: the grammar's tokenizer view and compile, the first decode
    out = {}
    for batch in batches:
        runs = c.interleave({"plain": lambda b=batch: run(b, False), "schema": lambda b=batch: run(b, True)}, reps)
        plain = c.median(r["tokens_per_s"] for r in runs["plain"])
        constrained = c.median(r["tokens_per_s"] for r in runs["schema"])
        steps = min(r["steps"] for side in runs.values() for r in side)
        out[batch] = {"plain": plain, "schema": constrained, "steps": steps}
    return out


def schema_table(title: str, results: dict) -> None:
    rows = []
    for batch, r in results.items():
        ratio = r["schema"] / r["plain"] if r["plain"] else 0.0
        rows.append([batch, c.fmt(r["plain"], " tok/s"), c.fmt(r["schema"], " tok/s"), f"{ratio:.3f}x",
                     c.verdict(ratio, 0.90, at_most=False), r["steps"]])
    c.table(title, rows, ["batch", "without", "with --schema", "ratio", "target", "fewest steps"])


def measure(label: str, model_dir: str, quant: str, pdf: str, args, tmp: str, snippet: bool,
            device: str = "cuda", dtype: str = "bfloat16") -> dict:
    """Load `model_dir` as the CLI does and time it: peak memory (CUDA), prefill, decode, pages/min."""
    import torch

    from idefics_cli.runtime.model import ModelOptions, load_engine

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0  # what an earlier measurement left is not counted
    t0 = time.perf_counter()
    engine = load_engine(ModelOptions(model=model_dir, quant=quant, dtype=dtype, device=device, split=True,
                                      max_new_tokens=args.max_new_tokens))
    load_s = time.perf_counter() - t0
    inputs = one_page_inputs(engine, pdf)
    timed_generate(engine, inputs, 2)  # warm-up
    prefill = statistics.median(timed_generate(engine, inputs, 1) for _ in range(args.reps))
    full = statistics.median(timed_generate(engine, inputs, args.max_new_tokens) for _ in range(args.reps))
    decode_tps = (args.max_new_tokens - 1) / max(full - prefill, 1e-9)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    batch = engine.auto_batch_size()
    pages = batch * args.batches
    quantization = engine.info.get("quantization", quant)
    print(f"  {label}: loaded in {load_s:.0f} s ({quantization}), peak {peak:.2f} GiB, auto batch size {batch}",
          file=sys.stderr)
    ppm = pipeline_pages_per_min(engine, pdf, pages, batch, args.max_new_tokens, tmp)
    row = {"label": label, "load": load_s, "peak": peak, "reserved": reserved, "prefill": prefill, "decode": decode_tps,
           "batch": batch, "ppm": ppm, "quantization": quantization}
    if snippet:
        row["snippet"] = snippet_pages_per_min(engine, pdf, args.snippet_pages, args.max_new_tokens)
        del inputs
        row["ask"] = ask_pages(engine, pdf, args.ask_pages, plain=False, base=before)
        row["ask_plain"] = ask_pages(engine, pdf, args.ask_pages, plain=True, base=before)
        inputs = None
        row["stages"] = stage_times(engine, pdf, 16, args.max_new_tokens, [1, 8])
        row["schema"] = schema_decode(engine, pdf, [1, 8], args.max_new_tokens, args.reps)
    del engine, inputs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


# (name, tiny.py family, tiny.py size): the newer members of the family at their real shapes, random weights
FAMILY_SHAPES = [("Idefics3-8B-Llama3", "idefics3", "idefics3-8b"),
                 ("SmolVLM-Instruct (2.2B)", "idefics3", "smolvlm-2b"),
                 ("SmolVLM-256M-Instruct", "idefics3", "smolvlm-256m")]


def family_rows(args, tmp: str, pdf: str, device: str, dtype: str, smoke: bool) -> list[dict]:
    """Each family shape built on `device`, loaded under `--quant auto` (nf4 from 4B), measured by `measure`."""
    import torch

    from idefics_cli.dev import tiny

    rows = []
    for name, family, size in FAMILY_SHAPES[-1:] if smoke else FAMILY_SHAPES:
        folder = os.path.join(tmp, f"{family}-{size}")
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        tiny.build(folder, size="tiny" if smoke else size, family=family, device=device, dtype=torch_dtype)
        gc.collect()
        rows.append(measure(f"{name}{' (smoke: tiny)' if smoke else ''}", folder, "auto", pdf, args, tmp,
                            snippet=False, device=device, dtype=dtype))
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def family_table(title: str, rows: list[dict]) -> None:
    c.table(title, [[r["label"], r["quantization"], f"{r['peak']:.2f} GiB", f"{r['prefill'] * 1000:.0f} ms",
                     f"{r['decode']:.1f}", r["batch"], f"{r['ppm'] / 60:.3f}"] for r in rows],
            ["model shape", "--quant auto chose", "peak VRAM", "prefill", "decode tok/s (batch 1)", "batch",
             "pages/s"])


def serve_p8_p9(model_dir: str, pdf: str, reps: int, new_tokens: int, device: str, smoke: bool) -> dict:
    """bench/serve.py's P8 and P9 on this model: an `idefics serve` child process on `device` (4-bit unless smoke)."""
    import base64

    with open(pdf, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    server = serve.Server(model_dir, new_tokens, smoke, device=device)
    try:
        return serve.p8_p9(server, data, iter(range(1, reps * 17 + 1)), reps)
    finally:
        server.close()


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, default=2, help="pages/min over this many batches of the auto size")
    p.add_argument("--snippet-pages", type=int, default=6, help="pages of the plain snippet's loop")
    p.add_argument("--ask-pages", type=int, default=25, help="pages of the one-question case")
    p.add_argument("--families", action="store_true", help="only the family shapes (FAMILY_SHAPES), after first light")
    args = p.parse_args(argv)
    import torch

    from idefics_cli import tune_process

    tune_process()  # measured in the commands' process settings (quiet libraries, tuned allocators)
    if not torch.cuda.is_available():
        print("P5 skipped: no CUDA GPU here (bench/gpu.py needs one; nothing was measured)", flush=True)
        if args.smoke:
            cpu_smoke(args)
        return 0
    if args.smoke:
        args.reps, args.max_new_tokens, args.batches, args.snippet_pages = 1, 8, 1, 2
    c.header("P5 GPU", args)
    print(f"# GPU: {torch.cuda.get_device_name()}", flush=True)
    from idefics_cli.dev import tiny

    if not first_light.first_light(c.model_dir("tiny"), "cuda"):  # does the path work here at all?
        return 1
    if args.families:
        with tempfile.TemporaryDirectory() as tmp:
            pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), 32 * args.batches)
            rows = family_rows(args, tmp, pdf, "cuda", "bfloat16", args.smoke)
        family_table(f"P5 families on {torch.cuda.get_device_name()}, random weights, bfloat16, {args.max_new_tokens} "
                     "new tokens a page", rows)
        c.footer()
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            t0 = time.perf_counter()
            model_dir = tiny.build(os.path.join(tmp, "model"), size="tiny" if args.smoke else "full", device="cuda",
                                   dtype=torch.bfloat16)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  built and saved the random model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), max(32 * args.batches, args.snippet_pages, args.ask_pages,
                                                                   17 * args.reps))
        bf16 = measure("bf16, no quantization", model_dir, "none", pdf, args, tmp, snippet=False)
        nf4 = measure("4-bit nf4, split", model_dir, "4bit", pdf, args, tmp, snippet=True)
        served = serve_p8_p9(model_dir, pdf, args.reps, args.max_new_tokens, "cuda", args.smoke)
    rows = []
    for r in (bf16, nf4):
        rows.append([r["label"], f"{r['peak']:.2f} GiB ({r['reserved']:.2f} reserved)", f"{r['load']:.0f} s",
                     f"{r['prefill'] * 1000:.0f} ms", f"{r['decode']:.1f}", r["batch"], f"{r['ppm']:.1f}"])
    rows.append(["model card snippet (4-bit, page by page)", "", "", "", "", 1, f"{nf4['snippet']:.1f}"])
    c.table(f"P5 {torch.cuda.get_device_name()}, full idefics2-8b shape, random weights, {args.max_new_tokens} new "
            f"tokens a page", rows, ["configuration", "peak VRAM", "load", "prefill", "decode tok/s (batch 1)",
                                      "batch", "pages/min"])
    vram = nf4["peak"]
    speed = nf4["ppm"] / nf4["snippet"]
    print(f"4-bit peak VRAM {vram:.2f} GiB: {'met' if vram <= 6.0 else 'NOT met'} (<= 6.0 GiB); "
          f"4-bit pages/min {speed:.2f}x the snippet's: {c.verdict(speed, 2.0, at_most=False)}; "
          f"vs bf16: VRAM {vram / bf16['peak']:.2f}x, pages/min {nf4['ppm'] / bf16['ppm']:.2f}x")
    ask_table(f"P5 ask over {args.ask_pages} pages, 4-bit nf4, {torch.cuda.get_device_name()}", args.ask_pages,
              nf4["ask"], nf4["ask_plain"])
    decompose.report([nf4["stages"]], [1, 8], 16, args.max_new_tokens, f" on {torch.cuda.get_device_name()}, 4-bit")
    schema_table(f"P11 decode tokens/s with and without a schema, 4-bit nf4, {torch.cuda.get_device_name()} "
                 f"({args.max_new_tokens} new tokens, median of {args.reps})", nf4["schema"])
    serve.p8_p9_tables(served, args.reps, args.max_new_tokens, f" on {torch.cuda.get_device_name()}, 4-bit nf4, "
                       f"{'tiny' if args.smoke else 'full'} shape")
    c.footer()
    return 0


def cpu_smoke(args) -> None:
    """The ask comparison, P3's decomposition and P11 on the CPU (tiny model, 3 small pages): their code runs
    without a GPU."""
    from idefics_cli.dev import tiny
    from idefics_cli.runtime.model import ModelOptions, load_engine

    args.reps, args.max_new_tokens, args.batches = 1, 4, 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or tiny.build(os.path.join(tmp, "model"), size="tiny")
        first_light.first_light(model_dir, "cpu")
        small = c.make_pdf(os.path.join(tmp, "small.pdf"), 8)  # one batch at the CPU's auto size
        rows = [measure("Idefics2 (smoke: tiny, no quantization)", model_dir, "none", small, args, tmp, snippet=False,
                        device="cpu", dtype="float32")]
        rows += family_rows(args, tmp, small, "cpu", "float32", smoke=True)
        pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), 3, "mixed")
        engine = load_engine(ModelOptions(model=model_dir, quant="none", device="cpu"))
        cli = ask_pages(engine, pdf, 3, plain=False, dpi=72)
        plain = ask_pages(engine, pdf, 3, plain=True, dpi=72)
        times = stage_times(engine, pdf, 3, 4, [1, 2], dpi=72)
        schema = schema_decode(engine, pdf, [1, 2], 4, 1, dpi=72)
        del engine
        served = serve_p8_p9(model_dir, c.make_pdf(os.path.join(tmp, "serve.pdf"), 17), 1, 4, "cpu", smoke=True)
    family_table("P5 and the family shapes on the CPU (smoke: tiny models, no VRAM)", rows)
    ask_table("P5 ask over 3 pages on the CPU (smoke: tiny model, no VRAM)", 3, cli, plain)
    decompose.report([times], [1, 2], 3, 4, " on the CPU (smoke)")
    schema_table("P11 decode tokens/s with and without a schema on the CPU (smoke)", schema)
    serve.p8_p9_tables(served, 1, 4, " on the CPU (smoke: tiny model)")


if __name__ == "__main__":
    sys.exit(main())
