"""P3's bound: a page's time split into stages at batch 1 and batch 8, and what batching can give at most.

    python bench/decompose.py [--reps N] [--pages 16] [--max-new-tokens 64] [--smoke]

A child process (bench/stages.py decompose) loads the random mid-size Idefics2 with the CLI's own loader (4-bit
nf4, CPU, float32 compute) and times, per page: rendering (PyMuPDF), preprocessing (the processor: resize,
split into 4 crops + the page, normalise; both ways, see below), the vision tower + connector, the language
prefill, and the decode (T new tokens, forced to length T). Vision and prefill are timed per call of B pages
and divided by B.

The bound: the plain loop does every stage of a page in turn, at batch 1. A pipeline at batch B can at best
hide rendering and preprocessing behind the model (the second core) and share each decode step among B pages;
the vision tower runs on every page whatever the batch. So

    bound(B) = (render + preprocess_plain + vision_1 + prefill_1 + T * decode_1) / (vision_B + prefill_B + T * decode_B)

with every term per page; preprocess_plain is the processor's whole call as the plain loop makes it (padded,
with its mask), where idefics-cli's own preprocessing (unpadded 8-bit images; the processor's value table maps
them into the vision step's input, so that cost is in vision_B) is cheaper; the
"without hiding" figure puts idefics-cli's render + preprocessing back in the denominator.

`--roofline` prints the same bound for the real idefics2-8b shape (tiny.SIZES["full"]) on a GPU, from its shapes
alone: vision + connector and prefill at the device's dense bf16 peak (compute-bound), a decode step at its memory
bandwidth (every 4-bit weight read once a step, whatever the batch), render + preprocess as measured here on the
CPU (`--cpu-page-s`, one core). These are floors for every term, so the ratio is what batching could give at best;
bench/gpu.py measures the real terms when a GPU is lent.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import common as c


def report(runs: list[dict], sizes: list[int], pages: int, n: int, where: str = "") -> float:
    """The stage table (seconds per page, medians over `runs` of stages.decompose_engine) and the bound."""

    def med(key, size=None):
        return c.median(r[key] if size is None else r["batches"][str(size)][key] for r in runs)

    render, pre = med("render_s"), med("preprocess_s")
    pre_plain = med("preprocess_plain_s") if all("preprocess_plain_s" in r for r in runs) else pre
    per_page = {}
    for size in sizes:
        per_page[size] = {"vision": med("vision_s", size) / size, "prefill": med("prefill_s", size) / size,
                          "decode": n * med("decode_token_s", size) / size}
    rows = [["render (PyMuPDF)", f"{render:.3f}", f"{render:.3f}", "per page"],
            ["preprocess (plain loop: processor's whole call)", f"{pre_plain:.3f}", "-", "per page"],
            ["preprocess (idefics-cli: split + resize, 8-bit)", f"{pre:.3f}", f"{pre:.3f}", "per page"]]
    for stage in ("vision", "prefill", "decode"):
        rows.append([{"vision": "vision tower + connector", "prefill": "language prefill",
                      "decode": f"decode, {n} tokens"}[stage]] + [f"{per_page[s][stage]:.3f}" for s in sizes]
                    + [f"{per_page[sizes[-1]][stage] / per_page[1][stage]:.2f}x at batch {sizes[-1]}"])
    serial = render + pre_plain + sum(per_page[1].values())  # the plain loop's page
    model_b = sum(per_page[sizes[-1]].values())
    rows.append(["page total, serial", f"{serial:.3f}", f"{render + pre + model_b:.3f}", ""])
    c.table(f"P3 decomposition{where}: seconds per page, {pages}-page PDF, {n} new tokens, median of {len(runs)} "
            "run(s)",
            rows, ["stage", "batch 1", f"batch {sizes[-1]}", "batch vs 1"])
    bound = serial / model_b
    print(f"bound on the speed-up over the plain loop at batch {sizes[-1]} (render + preprocess hidden, decode "
          f"shared): {serial:.3f} / {model_b:.3f} = {bound:.2f}x; without hiding render + preprocess: "
          f"{serial / (render + pre + model_b):.2f}x; model-only at batch 1 vs {sizes[-1]}: "
          f"{sum(per_page[1].values()) / model_b:.2f}x", flush=True)
    return bound


def roofline(tokens: int, batch: int, cpu_page_s: float, tflops: float, tbps: float, step_ms: float | None = None
             ) -> float:
    """The bound of the module docstring for idefics2-8b's shape on a GPU of `tflops` (bf16) and `tbps` (TB/s)."""
    from idefics_cli.dev import tiny

    vh, vi, vl, _, th, ti, tl, tn, tkv, pd, _, _, _ = tiny.SIZES["full"]
    patches = 5 * (980 // 14) * (756 // 14)  # a US-letter page split: 4 crops + the page, each 756 x 980 px
    vision_params = vl * (4 * vh * vh + 2 * vh * vi)
    vision = 2 * vision_params * patches + vl * 5 * 4 * (patches // 5) ** 2 * vh  # linear layers + attention
    connector = 2 * (2 * vh * ti + ti * th) * patches  # the modality projection (SwiGLU) on every patch
    text_params = tl * (2 * th * th + 2 * th * th * tkv // tn + 3 * th * ti) + 32003 * th
    prompt = 5 * 64 + 30  # image tokens + the question and the chat template
    prefill = 2 * text_params * prompt
    step_bytes = text_params * 0.5 * 1.06  # nf4 weights + double-quantized scales, read once per decode step
    vision_s, prefill_s = (vision + connector) / (tflops * 1e12), prefill / (tflops * 1e12)
    step_s = step_ms / 1000 if step_ms else step_bytes / (tbps * 1e12)
    serial = cpu_page_s + vision_s + prefill_s + tokens * step_s
    batched = max(cpu_page_s, vision_s + prefill_s + tokens * step_s / batch)  # CPU stages overlap the GPU's
    step = f"{step_ms} ms a step, given" if step_ms else f"{step_bytes / 1e9:.1f} GB a step"
    rows = [["render + preprocess (CPU, measured)", f"{cpu_page_s * 1000:.0f}", f"{cpu_page_s * 1000:.0f}"],
            [f"vision tower + connector ({(vision + connector) / 1e12:.1f} TFLOP)", f"{vision_s * 1000:.1f}",
             f"{vision_s * 1000:.1f}"],
            [f"language prefill ({prompt} tokens, {prefill / 1e12:.1f} TFLOP)", f"{prefill_s * 1000:.1f}",
             f"{prefill_s * 1000:.1f}"],
            [f"decode, {tokens} tokens ({step})", f"{tokens * step_s * 1000:.1f}",
             f"{tokens * step_s / batch * 1000:.1f}"]]
    c.table(f"P3 roofline for idefics2-8b on a GPU of {tflops:.0f} TFLOP/s bf16 and {tbps} TB/s: ms per page (floors)",
            rows, ["stage", "batch 1", f"batch {batch}"])
    bound = serial / batched
    print(f"bound at batch {batch}: {serial * 1000:.0f} / {batched * 1000:.0f} ms = {bound:.2f}x; the page rate is "
          f"capped at {1 / batched:.1f} pages/s by {'the CPU stages' if batched == cpu_page_s else 'the GPU'}",
          flush=True)
    return bound


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--roofline", action="store_true", help="only the idefics2-8b GPU bound from its shapes")
    p.add_argument("--cpu-page-s", type=float, default=0.3, help="render + preprocess seconds a page (--roofline)")
    p.add_argument("--tflops", type=float, default=989, help="dense bf16 TFLOP/s (--roofline; H200: 989)")
    p.add_argument("--tbps", type=float, default=4.8, help="memory bandwidth in TB/s (--roofline; H200: 4.8)")
    p.add_argument("--step-ms", type=float, help="a decode step's time instead of the bandwidth floor (--roofline)")
    args = p.parse_args(argv)
    if args.roofline:
        roofline(args.max_new_tokens, 8, args.cpu_page_s, args.tflops, args.tbps, args.step_ms)
        return 0
    reps, pages, n = (1, 2, 4) if args.smoke else (args.reps, args.pages, args.max_new_tokens)
    sizes = [1, 2] if args.smoke else [1, 8]
    c.header("P3 decomposition", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    with tempfile.TemporaryDirectory() as tmp:
        pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), pages)
        cmd = [sys.executable, os.path.join(c.HERE, "stages.py"), "decompose", model, pdf, c.TRANSCRIBE_PROMPT,
               "--max-new-tokens", str(n), "--batch-sizes", ",".join(map(str, sizes))]
        runs = [json.loads(r.stdout) for r in c.interleave({"decompose": lambda: c.run(cmd)}, reps)["decompose"]]

    report(runs, sizes, pages, n)
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
