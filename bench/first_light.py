"""First light on a device: does the whole path work there, before anything is timed (bench/gpu.py runs it first).

    python bench/first_light.py [--device cuda] [--model TINY_DIR]

On the tiny model, in float32 and in bfloat16 on the device: the token ids and the pixels idefics-cli feeds the
model equal the model card's code on the same device (one processor call); the greedy answer of the decode loop
equals `model.generate`'s (required in float32; reported in bfloat16, where batched products may round apart).
Then `ask`, `transcribe` (4 pages, batched) and `idefics serve` (one request) each answer through the CLI on the
device. Prints one line per check and `first light: ok` or `first light: FAILED`; exit 1 on a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common as c


def model_checks(model_dir: str, device: str, dtype: str, page) -> list[tuple[str, bool, str]]:
    import numpy as np
    import torch

    from idefics_cli.runtime.model import ModelOptions, load_engine
    from idefics_cli.runtime.vision import _own_size_pixels

    engine = load_engine(ModelOptions(model=model_dir, quant="none", device=device, dtype=dtype, max_new_tokens=12))
    card = engine.build_inputs([([page], c.QUESTION)])  # the model card's processor call, on the device
    ours = engine.prepare([([page], c.QUESTION)])
    checks = [(f"{dtype}: token ids", torch.equal(card["input_ids"].cpu(), ours["input_ids"].cpu()), "")]
    pixels = _own_size_pixels(engine.processor.image_processor, page, engine.options.split)
    mask = card["pixel_attention_mask"][0].cpu().numpy()
    same = len(pixels) == card["pixel_values"].shape[1] and all(
        np.array_equal(p, card["pixel_values"][0, k].cpu().float().numpy()[:, :int(mask[k].any(1).sum()),
                                                                            :int(mask[k].any(0).sum())])
        for k, p in enumerate(pixels))
    checks.append((f"{dtype}: pixels", same, f"{len(pixels)} images"))
    with torch.inference_mode():
        out = engine.model.generate(**card, do_sample=False, max_new_tokens=12)
    want = out[0, card["input_ids"].shape[1]:].tolist()
    want = want[: next((k + 1 for k, t in enumerate(want) if t in engine.eos_ids), len(want))]
    got = engine.generate(ours).token_ids
    checks.append((f"{dtype}: greedy answer = model.generate" + ("" if dtype == "float32" else " (reported)"),
                   got == want or dtype != "float32", "identical" if got == want else f"{got} vs {want}"))
    return checks


def cli_checks(model_dir: str, device: str, tmp: str) -> list[tuple[str, bool, str]]:
    import serve

    image = c.make_page_image(os.path.join(tmp, "page.png"))
    pdf = c.make_pdf(os.path.join(tmp, "doc.pdf"), 4)
    flags = ["--model", model_dir, "--device", device, "--quant", "none", "--max-new-tokens", "4"]
    ask = subprocess.run([*c.idefics_cmd(), "ask", image, c.QUESTION, "--json", *flags], capture_output=True,
                         text=True, env=c.env())
    ok = ask.returncode == 0 and json.loads(ask.stdout)["usage"]["completion_tokens"] > 0
    checks = [("ask", ok, ask.stderr.strip()[-200:])]
    out = os.path.join(tmp, "pages.jsonl")
    run = subprocess.run([*c.idefics_cmd(), "transcribe", pdf, "--out", out, "--batch-size", "4", *flags],
                         capture_output=True, text=True, env=c.env())
    records = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    checks.append(("transcribe, 4 pages batched", run.returncode == 0 and len(records) == 4
                   and all(r["status"] == "ok" for r in records), run.stderr.strip()[-200:]))
    import httpx

    server = serve.Server(model_dir, 4, smoke=True, device=device)
    try:
        body = {"model": "idefics", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()
        checks.append(("serve, one request", bool(answer.get("choices")), json.dumps(answer)[:200]))
    finally:
        server.close()
    return checks


def first_light(model_dir: str, device: str) -> bool:
    from idefics_cli.documents import open_document

    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        pdf = c.make_pdf(os.path.join(tmp, "one.pdf"), 1)
        with open_document(pdf, dpi=72) as doc:
            page = doc.render(1)
        for dtype in ("float32", "bfloat16"):
            checks += model_checks(model_dir, device, dtype, page)
        checks += cli_checks(model_dir, device, tmp)
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}", flush=True)
    good = all(ok for _, ok, _ in checks)
    print(f"first light on {device}: {'ok' if good else 'FAILED'}", flush=True)
    return good


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=1)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    model_dir = args.model or c.model_dir("tiny")
    return 0 if first_light(model_dir, args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
