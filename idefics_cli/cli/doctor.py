"""`idefics doctor`: can this machine run the chosen model setup, and if not, why not.

Contract: parsing and printing over the library's `doctor.diagnose` (docs/doctor.md). The report goes to stdout;
exit 0 when the setup can run, else exit 5 with a one-line reason on stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import IdeficsError
from ..tasks.doctor import SCHEMA, diagnose, human_bytes
from . import options as o

EXAMPLES = """
  idefics doctor                                     # the default setup: idefics2-8b, 4-bit, split
  idefics doctor --json | jq .estimate.total_bytes
  idefics doctor --model ./idefics2-nf4 --no-split   # a quantized folder, without image splitting
  idefics doctor --device cpu --quant none
"""


@o.model_params(512)
@o.runs
def doctor_command(
    out,
    json_: Annotated[bool, typer.Option("--json", help=f"Print one JSON object (schema {SCHEMA}).")] = False,
    opts: o.ModelOptions = None,
) -> int:
    """Check whether this machine can run the model. Versions, GPU, 4-bit, cache, memory; exit 5 if not."""
    try:
        with out.status("Checking…"):
            report = diagnose(opts)
    except IdeficsError as err:  # the model is not available: a script still reads the verdict on stdout
        if json_:
            out.json_line({"schema": SCHEMA, "ok": False, "reason": err.message})
        raise
    if json_:
        out.json_line(report)
    else:
        out.write(render(report))
    if not report["ok"]:
        raise IdeficsError("model_error", f"this setup cannot run: {report['reason']}")
    return 0


def render(r: dict) -> str:
    """The human report: one line per check, a verdict line last."""
    hb, ok, bad = human_bytes, "✓", "✗"
    v, s, b, m, e = r["versions"], r["setup"], r["bnb_4bit"], r["model"], r["estimate"]
    lines = ["versions   " + "  ".join(f"{k} {val or '-'}" for k, val in v.items())]
    cuda = r["cuda"]
    if cuda["available"]:
        for g in cuda["devices"]:
            lines.append(f"gpu {g['index']}      {g['name']} (sm {g['capability']}), {hb(g['free_bytes'])} free of "
                         f"{hb(g['total_bytes'])}")
    else:
        lines.append(f"gpu        none (CUDA not available), RAM {hb(r['system']['ram_available_bytes'])} available")
    lines.append(f"setup      {s['model']} · {s['quantization']} ({s['quantization_reason']}) · {s['dtype']} · "
                 f"{s['device']} · {'split' if s['split'] else 'no split'}")
    if b.get("ran"):
        mark = ok if b["ok"] else bad
        lines.append(f"4-bit      {mark} bitsandbytes nf4 matmul on {b['device']}: error {b['max_error']:.2g} "
                     f"(tolerance {b['tolerance']:g}), nf4 vs float {b['quantization_error']:.2g}")
    else:
        lines.append(f"4-bit      {bad} {b.get('error')}")
    if m["available"]:
        where = "local folder" if m["local_folder"] else f"HF cache, commit {m['commit']}"
        pre = f", pre-quantized {m['pre_quantized']}" if m["pre_quantized"] else ""
        lines.append(f"model      {ok} {where} ({hb(m['size_bytes'])}{pre}): {m['path']}")
    else:
        lines.append(f"model      {bad} not available locally (missing {', '.join(m['missing'][:3])})")
    if "total_bytes" in e:
        fits = {True: f" {ok} fits", False: f" {bad} does not fit", None: ""}[e["fits"]]
        lines.append(f"memory     ~{hb(e['total_bytes'])} = weights {hb(e['weights_bytes'])} "
                     f"({e['parameters'] / 1e9:.2f} B params) + KV {hb(e['kv_cache_bytes'])} "
                     f"({e['prompt_tokens']} prompt tokens, {e['images_per_page']} x {e['image_tokens_per_image']} "
                     f"image tokens) + activations {hb(e['activations_bytes'] + e['overhead_bytes'])};"
                     f" {hb(e['free_bytes'])} free{fits}")
    else:
        lines.append(f"memory     estimate unavailable: {e.get('error')}")
    for k, (name, x) in enumerate(r["extras"].items()):
        head = "extras     " if k == 0 else " " * 11
        if x["installed"]:
            have = ", ".join(f"{dist} {ver}" for dist, ver in x["packages"].items())
            lines.append(f"{head}{name:<7}{ok} {have}: {x['enables']}")
        else:
            lines.append(f"{head}{name:<7}- not installed ({x['install']}), would enable {x['enables']}")
    lines.append(f"verdict    {ok} ready" if r["ok"] else f"verdict    {bad} not ready: {r['reason']}")
    return "\n".join(lines) + "\n"
