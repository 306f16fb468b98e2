"""The small commands: `crops`, `doctor`, `pull`, `quantize`, `serve` and `mcp`, parsing and printing over the library
(docs/COMMAND.md). Data to stdout (crops, pull, quantize: a path a line; doctor: its report; mcp: the protocol only),
the rest to stderr. doctor exits 5 when the setup cannot run; pull's unreachable or gated repositories are
`model_error` (exit 5). serve refuses unsafe settings before binding (exit 2), drains on SIGTERM/Ctrl-C and exits 0;
mcp reads only under its `--root` folders, exits 0 when stdin closes, and SIGTERM/Ctrl-C end it at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import IdeficsError, UsageError
from ..tasks.doctor import SCHEMA, diagnose, human_bytes
from . import options as o

EXAMPLES = {
    "crops": """
  idefics crops samples/invoice.pdf                    # invoice-page1-crops.png
  idefics crops report.pdf --page 3 --out p3.png
  idefics crops scan.jpg --no-split --dir crops/       # crops/crop-1-whole.png
  idefics crops report.pdf --dpi 72                    # see what a low-resolution render loses
""",
    "doctor": """
  idefics doctor                                     # the default setup: idefics2-8b, 4-bit, split
  idefics doctor --json | jq .estimate.total_bytes
  idefics doctor --model ./idefics2-nf4 --no-split   # a quantized folder, without image splitting
  idefics doctor --device cpu --quant none
""",
    "pull": """
  idefics pull                                        # HuggingFaceM4/idefics2-8b
  idefics pull HuggingFaceM4/idefics2-8b-chatty --revision main
  HF_HOME=/data/hf idefics pull && HF_HOME=/data/hf idefics ask --offline doc.pdf "Summary?"
""",
    "quantize": """
  idefics quantize ~/models/idefics2-8b-nf4
  idefics quantize ./chatty-nf4 --model HuggingFaceM4/idefics2-8b-chatty
  idefics ask --model ~/models/idefics2-8b-nf4 --offline doc.pdf "What is the total?"
  idefics quantize ./nf4 --device cpu --dtype bfloat16   # prepare on a CPU box, run on a GPU
""",
    "serve": """
  idefics serve                                   # http://127.0.0.1:8000, the default model, 4-bit
  idefics serve --port 8080 --max-batch 8 --cache-mb 4096
  IDEFICS_API_KEY=secret idefics serve --host 0.0.0.0
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d @req.json
""",
    "mcp": """
  idefics mcp --root ~/Documents                     # an MCP host starts this; the tools read under ~/Documents
  idefics mcp --root ~/scans --root ~/invoices --quant 8bit
  idefics mcp --root ~/Documents --server http://127.0.0.1:8000   # answer with a running idefics serve
""",
}


@o.model_params(1, only=("model", "revision", "offline", "split"),
                fixed={"quant": o.Quant.none, "device": "cpu"})
@o.runs
def crops_command(
    output,
    doc: o.Doc,
    page: Annotated[int, typer.Option("--page", min=1, metavar="N", help="1-based page to show.")] = 1,
    out: Annotated[str | None, typer.Option("--out", "-o", metavar="FILE",
                                            help="Where to write the sheet (PNG).")] = None,
    dir_: Annotated[str | None, typer.Option("--dir", metavar="DIR",
                                             help="Write each image separately into this folder.")] = None,
    dpi: o.Dpi = None,
    password: o.Password = None,
    opts: o.ModelOptions = None,
) -> int:
    """Show the exact images the model receives for a page. A PNG sheet of the 4 crops and the whole page."""
    from ..documents import open_document
    from ..runtime.model import load_processor
    from ..tasks.crops import model_images, save_crops

    if out is not None and not os.path.basename(out) or dir_ == "":  # `--out DIR/` would write a hidden DIR/.png
        raise UsageError("--out needs a file name and --dir a folder name", "e.g. --out p3.png or --dir crops/")
    if out is not None and not out.lower().endswith(".png"):
        out += ".png"
    if dir_ is None and out is None:
        stem = "stdin" if doc == "-" else os.path.splitext(os.path.basename(doc.rstrip("/")))[0] or "document"
        stem = "".join(c if c.isprintable() else "_" for c in stem)  # one written path a line on stdout
        out = f"{stem}-page{page}-crops.png"
    with open_document(doc, password=password, dpi=dpi, longest_side=o.render_side(opts)) as opened:
        image = opened.render(page)
    with output.status(f"Loading the processor of {opts.model}…"):
        processor = load_processor(opts)
    images, names, image_tokens = model_images(processor, image)
    labels = [f"{name} · {im.width}x{im.height} px" for name, im in zip(names, images, strict=True)]
    title = (f"{os.path.basename(doc)} · page {page} · rendered {image.width}x{image.height} px -> "
             f"{len(images)} image(s), {image_tokens} image tokens · {opts.model}")
    written = save_crops(images, names, dir_, out, title, labels, None if doc == "-" else doc)
    for label in labels:
        output.info(label)
    for path in written:
        output.write(path + "\n")
    return 0


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
    where = "local folder" if m["local_folder"] else f"HF cache, commit {m['commit']}"
    if m["available"]:
        pre = f", pre-quantized {m['pre_quantized']}" if m["pre_quantized"] else ""
        lines.append(f"model      {ok} {where} ({hb(m['size_bytes'])}{pre}): {m['path']}")
    elif m["unreadable"]:
        lines.append(f"model      {bad} {where}, cannot be read: {'; '.join(m['unreadable'][:3])}")
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
            lines.append(f"{head}{name:<8}{ok} {have}: {x['enables']}")
        else:
            lines.append(f"{head}{name:<8}- not installed ({x['install']}), would enable {x['enables']}")
    lines.append(f"verdict    {ok} ready" if r["ok"] else f"verdict    {bad} not ready: {r['reason']}")
    return "\n".join(lines) + "\n"


@o.runs
def pull_command(
    out,
    model: Annotated[str, typer.Argument(metavar="MODEL", envvar="IDEFICS_MODEL", show_default=True,
                                         help="Hub id of the model.")] = o.DEFAULT_MODEL,
    revision: o.Revision = None,
) -> int:
    """Download a model into the Hugging Face cache. Weights, config and processor files, for --offline."""
    from ..hub import hub_id, names_path, pull
    from ..tasks.doctor import dir_size

    if names_path(model):
        raise UsageError(f"{model} is a local path; pull downloads a model from the hub", "pass a hub id (owner/name)")
    if not hub_id(model):
        raise UsageError(f"{model!r} is not a hub id", "pass owner/name, e.g. HuggingFaceM4/idefics2-8b")
    offline = f"{o.OFFLINE_ENV} is set" if o.env_offline() else None
    path = pull(model, revision, offline,
                on_start=lambda cache: out.info(f"Pulling {model}{'@' + revision if revision else ''} into {cache}…"))
    note = " (already cached, offline)" if offline else ""
    out.info(f"{model} @ {os.path.basename(path)}: {human_bytes(dir_size(path))}{note}")
    out.write(path + "\n")
    return 0


@o.model_params(1, only=("model", "revision", "dtype", "device", "offline"))
@o.runs
def quantize_command(
    out,
    out_dir: Annotated[str, typer.Argument(metavar="OUT_DIR", show_default=False,
                                           help="New folder for the 4-bit model (must be empty or missing).")],
    opts: o.ModelOptions = None,
) -> int:
    """Save a 4-bit (nf4) copy of the model with its processor. Later loads are small and fast."""
    from ..tasks.quantize import save_4bit

    done = save_4bit(opts, out_dir, status=out.status)
    ratio = f" ({done.after_bytes / done.before_bytes:.0%} of the original)" if done.before_bytes else ""
    out.console.print(f"weights: {human_bytes(done.before_bytes)} -> {human_bytes(done.after_bytes)}{ratio}; nf4, "
                      f"compute dtype {done.dtype}", markup=False, highlight=False)
    out.write(done.out_dir + "\n")
    return 0


@o.model_params(512)
@o.runs
def serve_command(
    out,
    host: Annotated[str, typer.Option(
        help="Address to listen on; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="IDEFICS_API_KEY", metavar="KEY", show_envvar=True,
                                                help="Require `Authorization: Bearer KEY` (every route but "
                                                     "/health).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=256, metavar="N", help="Requests decoded together.")] = 4,
    max_queue: Annotated[int, typer.Option(min=0, max=100000, metavar="N",
                                           help="Requests that may wait; more get 503 with Retry-After.")] = 16,
    cache_mb: Annotated[float | None, typer.Option(min=0, metavar="MB",
                                                   help="Prefix cache size (default: 1/4 of free GPU memory, "
                                                        "or 1/10 of available RAM up to 4 GiB; 0: off).")] = None,
    max_request_mb: Annotated[float, typer.Option(min=0.001, metavar="MB",
                                                  help="Largest request body (413 above).")] = 64.0,
    grace: Annotated[float, typer.Option(min=0, metavar="SECONDS",
                                         help="On SIGTERM/Ctrl-C, how long in-flight requests may finish.")] = 30.0,
    cors: Annotated[str | None, typer.Option(metavar="ORIGIN", help="Allow browser requests from this origin.")] = None,
    opts: o.ModelOptions = None,
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API. Chat completions with images and PDFs, batched."""
    from ..serve.config import ServeConfig, check

    config = ServeConfig(host=host, port=port, api_key=api_key or None, max_queue=max_queue, max_batch=max_batch,
                         cache_mb=cache_mb, max_request_mb=max_request_mb, grace=grace, cors=cors)
    check(config)
    try:
        from ..serve.server import run_server
    except ImportError as exc:
        raise UsageError(f"`idefics serve` needs the serve extra ({exc.name} is missing)",
                         "pip install 'idefics-cli[serve]'") from None
    from ..runtime.model import load_engine

    return run_server(config, lambda: load_engine(opts))


@o.model_params(None)  # not given: each tool answers up to its command's default (transcribe's 1024, ask's 512)
@o.runs
def mcp_command(
    out,
    root: Annotated[list[Path], typer.Option("--root", metavar="DIR", show_default=False,
                                             help="A folder the tools may read documents from (repeatable).")],
    opts: o.ModelOptions = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
) -> int:
    """Serve the documents under --root to an MCP host over stdio.

    Tools: ask_document, transcribe_document and list_pages, for Claude Desktop, an IDE or any MCP client.
    """
    import signal
    from dataclasses import asdict

    missing = [str(r) for r in root if not r.is_dir()]
    if missing:
        raise UsageError(f"--root {missing[0]} is not a folder", "give folders that exist")
    try:
        from ..mcp.server import serve_mcp
    except ImportError as exc:
        raise UsageError(f"`idefics mcp` needs the mcp extra ({exc.name} is missing)",
                         "pip install 'idefics-cli[mcp]'") from None

    def loader():  # the library's Model: loaded here, or a running server's
        from .. import connect, load

        if server:
            return connect(server, api_key=api_key, max_new_tokens=opts.max_new_tokens)
        return load(**asdict(opts))

    # SIGTERM and Ctrl-C end the process at once: a thread blocked reading stdin would otherwise hold it open
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return serve_mcp([str(r) for r in root], loader, lambda line: print(f"idefics mcp: {line}", file=sys.stderr,
                                                                        flush=True))
