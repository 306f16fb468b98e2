"""Smoke tests of the benchmarks: each bench script runs at its smallest size (--smoke) so it cannot rot.

Benchmarks are not tests: nothing here asserts a timing. The scripts selected in this session start at
once, in parallel child processes, on the session's tiny model; each test then checks its own script
exited 0 and printed its table (and, where it compares outputs, that they were identical).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"help": False, "ask": True, "transcribe": True, "memory": True, "shapes": True, "pages": True,
           "decompose": True, "gpu": False, "schema": True, "schema_engines": False,
           "serve": True, "continuous": True, "confidence": True,
           "families": False, "docling_peer": False, "vision": False}  # name -> takes --model (an Idefics2)


@pytest.fixture(scope="module")
def smoke(request, tiny_model, tmp_path_factory):
    """Start the smoke run of every bench script selected in this session; returns name -> Popen."""
    selected = {name for item in request.session.items if item.module is request.module
                for name in SCRIPTS if item.name.startswith(f"test_{name}_smoke")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDEFICS_BENCH_CACHE": str(tmp_path_factory.mktemp("bench"))}
    procs = {}
    for name, takes_model in SCRIPTS.items():
        if name in selected:
            cmd = [sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), "--smoke"]
            procs[name] = subprocess.Popen(cmd + (["--model", tiny_model] if takes_model else []), env=env,
                                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finished(smoke, name: str) -> str:
    out, err = smoke[name].communicate(timeout=600)
    assert smoke[name].returncode == 0, f"bench/{name}.py --smoke failed:\n{out}\n{err[-3000:]}"
    return out


def test_help_smoke(smoke):
    out = finished(smoke, "help")
    assert "P1 `idefics --help` wall time" in out and "idefics --help" in out and "x |" in out


def test_ask_smoke(smoke):
    out = finished(smoke, "ask")
    assert "P2 one page image" in out and "answers identical: yes" in out and "first-token ratio" in out


def test_transcribe_smoke(smoke):
    out = finished(smoke, "transcribe")
    assert "P3 2-page PDF (portrait)" in out and "pages/s" in out
    # a count of identical pages, not yes/no, and the batch-invariant side (--batch-size 1) beside the default
    assert re.search(r"pages identical to the plain loop: \d/2", out) and "--batch-size 1, batch-invariant" in out
    assert "batch-invariant --batch-size 1 costs" in out and "# load average at the end" in out
    assert "model only (engine's batched generate" in out and re.search(r"pages/s = [\d.]+x of model-only", out)
    # the quiet-machine gate: load before/after each run and the other processes' load are always reported
    assert "# load average before/after each run: " in out and "# foreign load during each run" in out
    assert "# QUIET" in out or "# NOT QUIET" in out


def test_families_smoke(smoke):
    out = finished(smoke, "families")
    assert "P14 2 pages of samples/report.pdf at 2048 px" in out and "plain per-page loop (model card" in out
    assert re.search(r"idefics transcribe \(--batch-size auto\)\s*\| [\d.]+", out)
    assert re.search(r"pages/s = [\d.]+x of model-only", out)


def test_vision_smoke(smoke):
    out = finished(smoke, "vision")
    encoded, tiles = map(int, re.search(r"\| default\s*\| [\d.]+ s\s*\| (\d+) of (\d+)\s*\|", out).groups())
    assert 0 < encoded < tiles  # the page's blank tiles reach the tower once
    assert re.search(r"\| no reuse\s*\| [\d.]+ s\s*\| (\d+) of \1\s*\|", out)  # every tile encoded
    assert re.search(r"\| no split\s*\| [\d.]+ s\s*\| 1 of 1\s*\|", out)


def test_decompose_smoke(smoke):
    out = finished(smoke, "decompose")
    assert "P3 decomposition: seconds per page, 2-page PDF" in out
    for stage in ("render (PyMuPDF)", "preprocess (idefics-cli: split + resize, 8-bit)",
                  "vision tower + connector", "language prefill", "decode, 4 tokens"):
        assert re.search(rf"\| {re.escape(stage)}\s*\| -?[\d.]+\s*\| -?[\d.]+", out), stage
    assert re.search(r"\| preprocess \(plain loop: processor's whole call\)\s*\| [\d.]+\s*\| -", out)
    assert re.search(r"bound on the speed-up over the plain loop at batch 2 .* = [\d.]+x", out)


def test_memory_smoke(smoke):
    out = finished(smoke, "memory")
    assert "P4 peak RSS" in out and "MiB" in out


def test_shapes_smoke(smoke):
    out = finished(smoke, "shapes")
    assert "P6 idefics transcribe, 4 pages" in out and "portrait and landscape alternating" in out and "MiB" in out


def test_pages_smoke(smoke):
    out = finished(smoke, "pages")
    assert "P7 peak RSS of idefics ask" in out and "4 pages, portrait and landscape alternating" in out
    assert re.search(r"2 portrait pages \(baseline\)\s*\|\s*640\s*\|", out)  # image tokens: 2 pages x 320 (split)


def test_serve_smoke(smoke):
    out = finished(smoke, "serve")
    assert "P8 second question over the same page" in out and "P9 8 one-page requests" in out
    assert "P10 idefics ask over one page" in out and "idefics ask --server (page not cached)" in out
    assert re.search(r"P9, 8 at once: [\d.]+ s until the last of them had its first token", out)
    assert re.search(r"P10 floor: the server's own time .* is [\d.]+ s = [\d.]+x of the cold ask", out)
    assert "answers identical: yes" in out


def test_a_registered_child_s_cpu_is_the_benchmark_s_own_not_foreign():
    """bench/common.py's quiet gate: the CPU of a long-lived child registered with own() (bench/serve.py's server)
    counts as the benchmark's own, read from /proc/PID/stat; a process that is gone counts 0."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import common
    finally:
        sys.path.pop(0)
    burn = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            "print('burnt', flush=True)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "burnt\n"
        before = common._own_cpu()
        common.own(child.pid)
        assert common._proc_cpu(child.pid) >= 0.5
        assert common._own_cpu() - before >= 0.5  # the child's CPU (at least its 0.5 s of busy loop) is now own
    finally:
        common.OWN_PIDS.discard(child.pid)
        child.communicate("")
    assert common._proc_cpu(child.pid) == 0.0


def test_gpu_smoke(smoke):
    out = finished(smoke, "gpu")
    import torch

    if torch.cuda.is_available():
        assert "P5" in out and "pages/min" in out
    else:  # the ask-over-many-pages comparison still runs, on the CPU
        assert out.startswith("P5 skipped: no CUDA GPU") and "P5 ask over 3 pages on the CPU" in out
        assert "first light on cpu: ok" in out and "ok   float32: greedy answer = model.generate" in out
        assert "P5 and the family shapes on the CPU" in out
        assert re.search(r"\| SmolVLM-256M-Instruct \(smoke: tiny\) +\| none +\|", out)  # --quant auto: none below 4B
        assert "first new token identical: " in out and "idefics ask (chunked" in out
        assert "P3 decomposition on the CPU (smoke)" in out and "vision tower + connector" in out
        assert "P11 decode tokens/s with and without a schema on the CPU (smoke)" in out
        assert "P8 second question over the same page on the CPU (smoke: tiny model)" in out and "P9 8 one-page" in out


def test_schema_smoke(smoke):
    out = finished(smoke, "schema")
    assert "P11 decode with the invoice schema vs without" in out and "P11 grammar (llguidance" in out
    assert re.search(r"\| 1\s*\| [\d.]+ tok/s\s*\| [\d.]+ tok/s\s*\| [\d.]+x", out)
    assert "compile the invoice schema" in out


def test_continuous_smoke(smoke):
    out = finished(smoke, "continuous")
    assert re.search(r"\| fixed batches of 8\s*\| [\d.]+ s\s*\| [\d.]+ pages/s", out)
    assert re.search(r"\| continuous\s*\| [\d.]+ s\s*\| [\d.]+ pages/s\s*\| [\d.]+ s\s*\| [\d.]+ s", out)
    assert re.search(r"# the steps alone \(time less prefill\): continuous vs fixed batches [\d.]+x", out)
    assert re.search(r"^P13 [\d.]+x$", out.strip().splitlines()[-1])


def test_confidence_smoke(smoke):
    out = finished(smoke, "confidence")
    assert re.search(r"\| 2\s*\| [\d.]+ tok/s\s*\| [\d.]+ tok/s\s*\| [\d.]+x", out)
    assert re.search(r"^P16 [\d.]+x$", out.strip().splitlines()[-1])


def test_schema_engines_smoke(smoke):
    out = finished(smoke, "schema_engines")
    for engine in ("idefics-cli (llguidance)", "llguidance (hf route, per row)"):  # a core dependency: always there
        assert re.search(rf"\| {re.escape(engine)}\s*\| yes", out), engine
    for engine in ("xgrammar", "xgrammar batch matcher", "outlines-core"):  # when installed; a row either way
        assert re.search(rf"\| {re.escape(engine)}\s*\| ", out), engine
    assert "# load average at the end" in out


def test_pymupdf_compare_runs_and_an_install_matches_itself(tmp_path):
    """bench/pymupdf_compare.py end to end with this interpreter as both installs: every page identical."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "pymupdf_compare.py"), "--python", sys.executable,
           "--python", sys.executable, "--work", str(tmp_path)]
    env = {**os.environ, "IDEFICS_DECODE_TIMEOUT": "5"}  # the corpus's slow-render.pdf is given up at the bound
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    n = len(json.load(open(tmp_path / "cases.json")))
    assert n >= 30 and last.endswith(f": {n}/{n}"), last
    assert "| sample-invoice.pdf | ok, 1 p" in result.stdout and "| aes256-r6-none.pdf | encrypted |" in result.stdout


def test_docling_peer_smoke(smoke):
    out = finished(smoke, "docling_peer")
    if out.startswith("P15 skipped"):  # docling[vlm] lives in its own environment; none is named here
        assert "no interpreter here imports docling" in out
    else:
        assert "P15 2 pages" in out and "same DocTags for page 1 at batch 1: yes" in out
