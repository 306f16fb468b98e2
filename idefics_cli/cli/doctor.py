"""`idefics doctor`: can this machine run the chosen model setup, and if not, why not.

Contract: reports library versions, CUDA and each GPU's free memory, a real bitsandbytes 4-bit matmul
on the chosen device (nf4 quantize + `matmul_4bit`, compared with float math), whether the model is a
complete local folder or in the HF cache (which commit), and a memory estimate for model x quantization
x split from its config.json, and which optional features (extras: ray, serve, schema) are installed, from
package metadata without importing them. The report goes to stdout (one JSON object with `--json`, schema
`idefics-cli.doctor/1`). Exit 0 when the setup can run: 4-bit works on the device (for `--quant 4bit`),
the model is available locally and, on a GPU, the estimate fits in free memory; else exit 5 with a
one-line reason on stderr. A hub model that is not cached while offline or without the hub fails first,
within a second, like every command (hub.local_only), before the checks run (`--json` then prints only
`schema`, `ok` and `reason`). The network is touched only
to fetch config.json for the estimate of a model that is not cached yet, never with `--offline`.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from . import options as o

SCHEMA = "idefics-cli.doctor/1"
EPILOG = """Examples:

\b
  idefics doctor                                     # the default setup: idefics2-8b, 4-bit, split
  idefics doctor --json | jq .estimate.total_bytes
  idefics doctor --model ./idefics2-nf4 --no-split   # a quantized folder, without image splitting
  idefics doctor --device cpu --quant none
"""


def doctor(
    json_: Annotated[bool, typer.Option("--json", help=f"Print one JSON object (schema {SCHEMA}).")] = False,
    model: o.Model = o.DEFAULT_MODEL,
    revision: o.Revision = None,
    quant: o.QuantOpt = o.Quant.bit4,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.Device = "auto",
    offline: o.Offline = False,
    split: o.Split = True,
    max_new_tokens: o.max_new_tokens_option(512) = 512,
) -> None:
    """Check versions, GPU, 4-bit support, the model cache and the memory needed; exit 5 if it cannot run."""
    from ..output import Output

    out = Output()
    opts = o.model_options(model, revision, quant, dtype, device, offline, split, max_new_tokens)
    o.run_and_exit(lambda: _doctor(out, opts, json_), out)


def diagnose(opts) -> dict:
    """Every check, as one JSON-ready dict (`ok` and `reason` hold the verdict)."""
    from .. import diagnostics as d
    from .. import extras
    from ..engine import QUANT_NAMES
    from ..errors import IdeficsError
    from ..model import quiet_libraries, resolve_device, resolve_dtype

    quiet_libraries()
    report: dict = {"schema": SCHEMA, "ok": False, "reason": None, "versions": d.versions(), "system": d.system_info(),
                    "cuda": d.cuda_info()}
    problems: list[str] = []
    try:
        device = resolve_device(opts.device)
    except IdeficsError as err:
        device = None
        problems.append(err.message)
    dtype = resolve_dtype(opts.dtype, device or "cpu")
    files = d.model_files(opts.model, opts.revision)
    quant = "4bit" if files["pre_quantized"] == "nf4" else opts.quant
    report["setup"] = {"model": opts.model, "revision": opts.revision, "quant": quant,
                       "quantization": QUANT_NAMES[quant], "dtype": str(dtype).replace("torch.", ""),
                       "device": device or opts.device, "split": opts.split}
    report["bnb_4bit"] = d.check_4bit(device, dtype) if device else {
        "ran": False, "ok": False, "device": None, "dtype": None, "max_error": None, "quantization_error": None,
        "tolerance": None, "error": "no usable device", "seconds": None}
    report["model"] = files
    report["estimate"] = _estimate(opts, files, quant, dtype, device)
    report["extras"] = extras.report()  # optional features: reported, never a reason to fail

    if device and quant == "4bit" and not report["bnb_4bit"]["ok"]:
        problems.append(f"bitsandbytes 4-bit does not work on {device}: {report['bnb_4bit']['error']}")
    if quant == "8bit" and device and not device.startswith("cuda"):
        problems.append("--quant 8bit needs a CUDA GPU")
    if not files["available"]:
        where = "the local folder" if files["local_folder"] else "the local HF cache"
        hint = "" if files["local_folder"] else f" (run `idefics pull {opts.model}`)"
        problems.append(f"{opts.model} is not complete in {where}, missing {', '.join(files['missing'][:3])}{hint}")
    need, free = report["estimate"].get("total_bytes"), _free_bytes(report["cuda"], device)
    report["estimate"]["free_bytes"] = free
    report["estimate"]["fits"] = None if need is None or free is None else need <= free
    if report["estimate"]["fits"] is False and device and device.startswith("cuda"):
        problems.append(f"needs about {d.human_bytes(need)} but {device} has {d.human_bytes(free)} free"
                        " (try --quant 4bit or --no-split)")
    report["ok"] = not problems
    report["reason"] = "; ".join(problems) or None
    return report


def _free_bytes(cuda: dict, device: str | None) -> int | None:
    from ..diagnostics import system_info

    if device is None:
        return None
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        gpus = [g for g in cuda["devices"] if g["index"] == index]
        return gpus[0]["free_bytes"] if gpus else None
    return system_info()["ram_available_bytes"]


def _estimate(opts, files, quant, dtype, device) -> dict:
    """The memory estimate, from a local or cached config.json (fetched when online and not cached)."""
    from .. import diagnostics as d
    from ..hub import probe_endpoint

    folder = files["path"]
    config = os.path.join(folder, "config.json") if folder else None
    processor_config = os.path.join(folder, "processor_config.json") if folder else None
    try:
        if not (config and os.path.exists(config)) and not files["local_folder"] and not opts.offline:
            from huggingface_hub import constants, hf_hub_download

            why = None if constants.HF_HUB_OFFLINE else probe_endpoint(constants.ENDPOINT, timeout=3)
            if constants.HF_HUB_OFFLINE or why:
                return {"error": f"config.json is not cached and the hub cannot be reached ({why or 'offline'})"}
            config = hf_hub_download(opts.model, "config.json", revision=opts.revision, etag_timeout=5)
            try:
                processor_config = hf_hub_download(opts.model, "processor_config.json", revision=opts.revision,
                                                   etag_timeout=5)
            except Exception:  # noqa: BLE001 - optional: image_seq_len falls back to the config
                processor_config = None
        if not (config and os.path.exists(config)):
            return {"error": "config.json is not in the local cache" + (" (offline)" if opts.offline else "")}
        import torch

        nbytes = torch.empty((), dtype=dtype).element_size()
        return d.memory_estimate(config, processor_config, quant, opts.split, nbytes, opts.max_new_tokens,
                                 bool(device and device.startswith("cuda")))
    except Exception as exc:  # noqa: BLE001 - the estimate is advisory
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _doctor(out, opts, as_json: bool) -> int:
    from ..errors import IdeficsError
    from ..hub import local_only

    try:
        local_only(opts)  # a model that is not cached and cannot be fetched: one line at once, before the checks
    except IdeficsError as err:
        if as_json:  # a script still reads the verdict on stdout
            out.json_line({"schema": SCHEMA, "ok": False, "reason": err.message})
        raise
    with out.status("Checking…"):
        report = diagnose(opts)
    if as_json:
        out.json_line(report)
    else:
        out.write(render(report))
    if not report["ok"]:
        raise IdeficsError("model_error", f"this setup cannot run: {report['reason']}")
    return 0


def render(r: dict) -> str:
    """The human report: one line per check, a verdict line last."""
    from ..diagnostics import human_bytes as hb

    ok, bad = "✓", "✗"
    v, s, b, m, e = r["versions"], r["setup"], r["bnb_4bit"], r["model"], r["estimate"]
    lines = ["versions   " + "  ".join(f"{k} {val or '-'}" for k, val in v.items())]
    cuda = r["cuda"]
    if cuda["available"]:
        for g in cuda["devices"]:
            lines.append(f"gpu {g['index']}      {g['name']} (sm {g['capability']}), {hb(g['free_bytes'])} free of "
                         f"{hb(g['total_bytes'])}")
    else:
        lines.append(f"gpu        none (CUDA not available), RAM {hb(r['system']['ram_available_bytes'])} available")
    lines.append(f"setup      {s['model']} · {s['quantization']} · {s['dtype']} · {s['device']} · "
                 f"{'split' if s['split'] else 'no split'}")
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
