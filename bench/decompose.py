"""P3's bound: a page's time split into stages at batch 1 and batch 8, and what batching can give at most.

    python bench/decompose.py [--reps N] [--pages 16] [--max-new-tokens 64] [--smoke]

A child process (bench/stages.py decompose) loads the random mid-size Idefics2 with the CLI's own loader (4-bit
nf4, CPU, float32 compute) and times, per page: rendering (PyMuPDF), preprocessing (the processor: resize,
split into 4 crops + the page, normalise), the vision tower + connector, the language prefill, and the decode
(T new tokens, forced to length T). Vision and prefill are timed per call of B pages and divided by B.

The bound: the plain loop does every stage of a page in turn, at batch 1. A pipeline at batch B can at best
hide rendering and preprocessing behind the model (the second core) and share each decode step among B pages;
the vision tower runs on every page whatever the batch. So

    bound(B) = (render + preprocess + vision_1 + prefill_1 + T * decode_1) / (vision_B + prefill_B + T * decode_B)

with every term per page. The same formula with idefics2-8b's shapes on a GPU is in bench/RESULTS.md.
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
    per_page = {}
    for size in sizes:
        per_page[size] = {"vision": med("vision_s", size) / size, "prefill": med("prefill_s", size) / size,
                          "decode": n * med("decode_token_s", size) / size}
    rows = [["render (PyMuPDF)", f"{render:.3f}", f"{render:.3f}", "per page"],
            ["preprocess (processor)", f"{pre:.3f}", f"{pre:.3f}", "per page"]]
    for stage in ("vision", "prefill", "decode"):
        rows.append([{"vision": "vision tower + connector", "prefill": "language prefill",
                      "decode": f"decode, {n} tokens"}[stage]] + [f"{per_page[s][stage]:.3f}" for s in sizes]
                    + [f"{per_page[sizes[-1]][stage] / per_page[1][stage]:.2f}x at batch {sizes[-1]}"])
    serial = render + pre + sum(per_page[1].values())
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


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
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
