"""Shared helpers of the benchmarks: models, documents, timed child processes, medians and tables.

Contract: every benchmark runs what it measures in a child process (so imports, loading and memory are
the child's own) and compares it with a baseline measured in the same run, interleaved (A, B, A, B, ...)
so that load from other processes on the machine hits both alike; figures are medians of several runs.
Nothing here imports torch: the driver stays light and builds models in a child process too.

Quiet-machine gate: a ratio taken while other jobs load the machine is not a result. Every `run` records the
1-minute load average before and after the child, and the CPU that *other* processes used while it ran
("foreign load", in cores: the machine's busy time from /proc/stat minus the child's and this driver's own CPU
time, over the wall time; the load average after a run mostly counts the benchmark itself). A long-lived child
of the benchmark that works while runs are timed (bench/serve.py's server) is registered with `own(pid)`: its
CPU (/proc/PID/stat utime + stime, plus its waited-for children's) counts as the benchmark's own, not foreign.
`footer()` prints them and marks the whole benchmark NOT QUIET when the load average before the first run, or
the foreign load of any run, exceeds `QUIET` (0.5): such figures must not go into RESULTS.md. `header()` first
waits (up to `--settle` seconds, default 120) for the load average to fall under `QUIET`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUESTION = "What is the total amount due on this page?"
TRANSCRIBE_PROMPT = "Transcribe all the text on this page, in reading order, as Markdown."


def parser(description: str, reps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="smallest run: tiny model, 2 pages, 1 repetition")
    p.add_argument("--reps", type=int, default=reps, help=f"runs of each side, interleaved (default {reps})")
    p.add_argument("--model", help="an Idefics2 folder to use instead of building the random one")
    p.add_argument("--settle", type=float, default=120,
                   help="seconds to wait at the start for the load average to fall under 0.5 (default 120)")
    return p


PYCACHE = os.path.join(tempfile.gettempdir(), "idefics-bench-pycache")


def env() -> dict:
    """Environment of every child: offline, quiet, same for baseline and CLI.

    Bytecode is cached (under PYCACHE, outside the source tree) as for any installed package, even where the
    shell sets PYTHONDONTWRITEBYTECODE: otherwise every run would compile the CLI's own modules again.
    """
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": PYCACHE}
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    return out


def prime() -> None:
    """Once per machine: import the whole stack in a child so its bytecode is cached before anything is timed."""
    marker = os.path.join(PYCACHE, ".primed")
    if os.path.exists(marker):
        return
    code = ("import torch, transformers, bitsandbytes, pymupdf, PIL.Image\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig\n"
            "from transformers import Idefics2ForConditionalGeneration, Idefics2Processor\n"
            "import transformers.generation.utils, transformers.integrations.bitsandbytes\n"
            "import idefics_cli.cli, idefics_cli.runtime.model, idefics_cli.tasks.pipeline, idefics_cli.documents\n")
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, capture_output=True)
    with open(marker, "w"):
        pass


def idefics_cmd() -> list[str]:
    """The installed `idefics` entry point (what users run), else `python -m idefics_cli`."""
    exe = shutil.which("idefics", path=os.path.dirname(sys.executable)) or shutil.which("idefics")
    return [exe] if exe else [sys.executable, "-m", "idefics_cli"]


def cache_dir() -> str:
    path = os.environ.get("IDEFICS_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "idefics-bench")
    os.makedirs(path, exist_ok=True)
    return path


def model_dir(size: str, family: str = "idefics2") -> str:
    """A random model of `family` and `size` (tiny.py: its real tokens and settings), built once per shape, cached."""
    from idefics_cli.dev import tiny

    shapes = tiny.SIZES if family == "idefics2" else tiny.SMOL_SIZES
    key = hashlib.sha1(json.dumps([size, shapes[size]]).encode()).hexdigest()[:10]
    out = os.path.join(cache_dir(), f"{family}-{size}-{key}")
    if not os.path.exists(os.path.join(out, "config.json")):
        tmp = out + f".tmp{os.getpid()}"
        print(f"building the random {size} {family} in {out} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "idefics_cli.dev.tiny", tmp, "--size", size, "--family", family],
                       env=env(), check=True, capture_output=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another bench (the smoke tests run several at once) built it meanwhile
            if not os.path.exists(os.path.join(out, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_pdf(path: str, pages: int, layout: str = "portrait") -> str:
    """A US-letter PDF of `pages` distinct pages of invoice-like text (rendered at 1960 px like real scans).

    `layout`: "portrait" (every page), "mixed" (portrait and landscape pages alternate, as in reports with wide
    tables), or "varied" (a cycle of US-letter, A4 and legal, portrait or landscape: six page sizes).
    """
    import pymupdf

    sizes = {"portrait": [(612, 792)], "mixed": [(612, 792), (792, 612)],
             "varied": [(612, 792), (842, 595), (595, 842), (792, 612), (612, 1008), (1008, 612)]}[layout]
    doc = pymupdf.open()
    for i in range(pages):
        width, height = sizes[i % len(sizes)]
        page = doc.new_page(width=width, height=height)
        page.insert_text((72, 72), f"INVOICE No. {1000 + i}", fontsize=20)
        for k in range(min(24, (height - 200) // 24)):
            page.insert_text((72, 110 + 24 * k), f"Item {k + 1}: widget type {(i * 7 + k) % 13}, "
                             f"quantity {(i + k) % 9 + 1}, price $ {(i * 31 + k * 17) % 500}.99", fontsize=11)
        bottom = height - 92
        page.draw_rect(pymupdf.Rect(72, bottom, 540, bottom + 40), color=(0, 0, 0), fill=((i % 5) / 5, 0.8, 0.9))
        page.insert_text((80, bottom + 25), f"Total amount due: $ {(i * 997) % 10000}.00", fontsize=14)
    doc.save(path)
    doc.close()
    return path


def make_page_image(path: str) -> str:
    """Page 1 of such a PDF as a PNG photo of the page (1515 x 1960 px)."""
    import pymupdf

    pdf = make_pdf(path + ".pdf", 1)
    with pymupdf.open(pdf) as doc:
        page = doc[0]
        scale = 1960 / max(page.rect.width, page.rect.height)
        page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False).save(path)
    return path


QUIET = 0.5  # load average / foreign cores above which figures are not recorded
LOADS: list[dict] = []  # one entry per `run`: load average before/after, foreign load during


def _busy_seconds() -> float | None:
    """CPU seconds all processors have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


OWN_PIDS: set[int] = set()  # long-lived children of the benchmark (own(pid)): their CPU is not foreign load


def own(pid: int) -> None:
    """Count the CPU of the benchmark's long-lived child `pid` (e.g. a server it started) as its own."""
    OWN_PIDS.add(pid)


def _proc_cpu(pid: int) -> float:
    """CPU seconds of process `pid` and its waited-for children (/proc/PID/stat), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def _own_cpu() -> float:
    """This driver's CPU, its waited-for children's (os.times) and its registered long-lived children's."""
    t = os.times()
    return t.user + t.system + sum(_proc_cpu(pid) for pid in OWN_PIDS)


def one_minute_load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def settle(limit: float) -> float:
    """Wait up to `limit` seconds for the 1-minute load average to fall under QUIET; returns it."""
    deadline = time.monotonic() + limit
    load = one_minute_load()
    while load >= QUIET and time.monotonic() < deadline:
        print(f"# waiting for a quiet machine: load average {load:.2f}", file=sys.stderr, flush=True)
        time.sleep(10)
        load = one_minute_load()
    return load


@dataclass
class Run:
    """One child process: wall time, time to its first stdout byte, peak RSS, output."""

    wall: float
    first_byte: float | None
    max_rss_mib: float
    stdout: str
    stderr: str
    code: int


def parse_or_child(p: argparse.ArgumentParser, argv, child) -> argparse.Namespace | None:
    """Parse `argv` with a hidden `--child SPEC`: as the child, print `child(**SPEC)` as JSON and return None."""
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return None
    return args


def in_child(script: str, spec: dict):
    """Run `script --child SPEC` in a fresh process (this repo and bench/ importable); its JSON (last stdout line)."""
    result = run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                 extra_env={"PYTHONPATH": os.pathsep.join([ROOT, HERE])})
    return json.loads(result.stdout.strip().splitlines()[-1])


def decode_bench(script: str, doc: str, title: str, child, argv, reps: int, batches=(1, 8)):
    """The front of the decode-rate benches (schema.py, confidence.py): their options, the child process that
    decodes one page image at each batch size, and the header. None when this process is the child; else
    (reps, batches, new tokens, the child's JSON)."""
    p = parser(doc, reps=reps)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = parse_or_child(p, argv, child)
    if args is None:
        return None
    reps = 1 if args.smoke else args.reps
    header(title, args)
    model = args.model or model_dir("tiny" if args.smoke else "mid")
    batches = [1, 2] if args.smoke else list(batches)
    tokens = 4 if args.smoke else args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        image = make_page_image(os.path.join(tmp, "page.png"))
        spec = {"model": model, "image": image, "reps": reps, "max_new_tokens": tokens, "batches": batches}
        return reps, batches, tokens, in_child(script, spec)


def run(cmd: list[str], timeout: float = 3600, extra_env: dict | None = None) -> Run:
    """Run `cmd`; time it from spawn to exit and to its first byte on stdout; peak RSS from wait4()."""
    load_before, busy0, own0 = one_minute_load(), _busy_seconds(), _own_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env(), **(extra_env or {})},
                            cwd=ROOT)
    first: list[float] = []
    chunks: list[bytes] = []
    errs: list[bytes] = []

    def read_out():
        while chunk := proc.stdout.read1(65536):
            if not first:
                first.append(time.perf_counter() - start)
            chunks.append(chunk)

    threads = [threading.Thread(target=read_out), threading.Thread(target=lambda: errs.append(proc.stderr.read()))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.005)
    wall = time.perf_counter() - start
    busy1, own1 = _busy_seconds(), _own_cpu()
    child_cpu = usage.ru_utime + usage.ru_stime
    foreign = None if busy0 is None else max(0.0, (busy1 - busy0 - child_cpu - (own1 - own0)) / wall)
    LOADS.append({"before": load_before, "after": one_minute_load(), "foreign": foreign, "wall": wall})
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = Run(wall, first[0] if first else None, usage.ru_maxrss / 1024, b"".join(chunks).decode(),
                 b"".join(errs).decode(errors="replace"), proc.returncode)
    if result.code != 0:
        raise SystemExit(f"command failed ({result.code}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result


def interleave(sides: dict, reps: int) -> dict[str, list]:
    """Call each side's function once per round, alternating the order, `reps` rounds; results per side."""
    out: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for k in range(reps):
        for name in names if k % 2 == 0 else names[::-1]:
            out[name].append(sides[name]())
            print(f"  round {k + 1}/{reps} {name}: done", file=sys.stderr, flush=True)
    return out


def median(values) -> float:
    return statistics.median(values)


def fmt(value: float, unit: str = "") -> str:
    return f"{value:.3g}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"


def table(title: str, rows: list[list], headers: list[str]) -> str:
    """A Markdown table (also readable on a terminal), printed and returned."""
    if not quiet():
        title += f" [NOT QUIET: load above {QUIET}, not for RESULTS.md]"
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = f"\n{title}\n\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def verdict(ratio: float, target: float, at_most: bool) -> str:
    ok = ratio <= target if at_most else ratio >= target
    return f"{'met' if ok else 'NOT met'} ({'<=' if at_most else '>='} {target}x)"


def load_average() -> str:
    """The 1-minute load average now (figures are only worth recording below 0.5)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


START_LOAD: list[float] = []


def quiet() -> bool:
    """True when the machine was quiet for the whole benchmark (see the module docstring)."""
    foreign = [r["foreign"] for r in LOADS if r["foreign"] is not None]
    return all(x < QUIET for x in START_LOAD) and all(x < QUIET for x in foreign)


def footer() -> None:
    foreign = [r["foreign"] for r in LOADS if r["foreign"] is not None]
    if LOADS:
        pairs = [f"{r['before']:.2f}/{r['after']:.2f}" for r in LOADS]
        print(f"# load average before/after each run: {', '.join(pairs)}", flush=True)
    if foreign:
        print(f"# foreign load during each run (cores used by other processes): "
              f"{', '.join(f'{x:.2f}' for x in foreign)}; max {max(foreign):.2f}", flush=True)
    print(f"# load average at the end: {load_average()}", flush=True)
    if quiet():
        print(f"# QUIET: load average at the start and foreign load of every run under {QUIET}", flush=True)
    else:
        start = f"{START_LOAD[0]:.2f}" if START_LOAD else "n/a"
        print(f"# NOT QUIET (load average at the start {start}, foreign load up to "
              f"{max(foreign, default=0):.2f}): these figures must not be recorded in RESULTS.md", flush=True)


def machine() -> str:
    """One line about this machine: CPU, cores, memory, Python and library versions, date."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "bitsandbytes"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, {libs}; "
            f"load average {load:.2f}; {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")


def header(name: str, args) -> None:
    prime()
    START_LOAD.append(settle(0 if args.smoke else getattr(args, "settle", 120)))
    print(f"# {name}: {' '.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}", flush=True)
    print(f"# machine: {machine()}", flush=True)
    if args.smoke:
        print("# smoke run: tiny model, smallest sizes, 1 repetition; the figures mean nothing", flush=True)
