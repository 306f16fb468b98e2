"""`transcribe --engine ray`: same records as the local engine, actor crashes survived, resume across engines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import make_image, make_pdf, run_idefics

ray = pytest.importorskip("ray")

FAST = ["--quant", "none", "--max-new-tokens", "3", "--dpi", "36", "-q"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per module, with a fixed CPU count."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    make_pdf(docs / "report.pdf", n_pages=3)
    make_image(300, 200, seed=3).save(docs / "sub" / "scan.png")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage without objects")
    (docs / "notes.pdf").write_text("not a document, whatever its name says")
    (docs / "notes.txt").write_text("not a document: skipped")
    return docs


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def essence(rows: list[dict]) -> list[tuple]:
    return sorted((os.path.basename(r["path"]), r["page"], r["status"], r["text"], (r["error"] or {}).get("code"),
                   r["sha256"], r["settings"]) for r in rows)


def test_ray_records_equal_local_records(cli, tiny_model, local_ray, folder, tmp_path):
    from PIL import Image

    Image.new("RGB", (300, 200), "white").save(folder / "blank.png")  # recorded without the model, by both
    local = cli("transcribe", folder, "--out", tmp_path / "local.jsonl", "--model", tiny_model, *FAST)
    remote = cli("transcribe", folder, "--out", tmp_path / "ray.jsonl", "--engine", "ray", "--model", tiny_model,
                 *FAST)
    assert local.exit_code == remote.exit_code == 3, remote.stderr
    a, b = records(tmp_path / "local.jsonl"), records(tmp_path / "ray.jsonl")
    assert essence(a) == essence(b)
    assert Counter(r["status"] for r in b) == {"ok": 5, "error": 2}
    blank = [(r["warnings"], r["usage"]) for r in a + b if r["path"].endswith("blank.png")]
    assert blank[0] == blank[1] and "blank_page" in blank[0][0] and blank[0][1]["completion_tokens"] == 0
    assert {(r["error"] or {}).get("code") for r in b} == {None, "corrupt", "unsupported_format"}


def test_ray_folder_output_writes_markdown(cli, tiny_model, local_ray, folder, tmp_path):
    out = tmp_path / "out"
    result = cli("transcribe", folder, "--out", out, "--engine", "ray", "--model", tiny_model, *FAST)
    assert result.exit_code == 3
    assert (out / "report.md").read_text().count("<!-- page ") == 3
    assert (out / "sub" / "scan.md").exists()


def actor_pids() -> list[int]:
    """PIDs of Ray worker processes running our model actor (titled `ray::MapWorker(...)` or `ray::_MapWorker`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::") and "MapWorker" in cmdline:
                pids.append(int(entry))
    return pids


def test_killed_model_actor_is_replaced_and_every_page_done_once(tiny_model, local_ray, tmp_path):
    from idefics_cli.documents import open_document
    from idefics_cli.runtime.model import ModelOptions
    from idefics_cli.tasks.batch import walk
    from idefics_cli.tasks.pipeline import TranscribeJob
    from idefics_cli.tasks.ray_engine import run_on_ray as run
    from idefics_cli.tasks.transcription import TranscribeRequest
    from idefics_cli.tasks.writers import JsonlSink

    docs_dir = tmp_path / "many"
    docs_dir.mkdir()
    for i in range(3):
        make_pdf(docs_dir / f"d{i}.pdf", n_pages=4)
    docs, _ = walk([str(docs_dir)])
    out = str(tmp_path / "kill.jsonl")
    sink = JsonlSink(out)
    options = ModelOptions(model=tiny_model, quant="none", device="cpu", max_new_tokens=3)
    request = TranscribeRequest((str(docs_dir),), out, options, prompt="Transcribe.", batch_size=1)
    killed = []

    def killer():
        """Once the model actor has answered its first page (a record is written), kill it (SIGKILL) mid-run."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if os.path.exists(out) and os.path.getsize(out) > 0:
                for pid in actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    job = TranscribeJob(request, docs, sink, lambda p: open_document(p, dpi=36),
                        lambda d: list(range(1, d.page_count + 1)))
    for _ in run(job):
        pass
    summary = job.summary
    sink.close()
    thread.join(timeout=5)
    assert killed, "the model actor was never found to kill"
    rows = records(out)
    assert Counter((os.path.basename(r["path"]), r["page"]) for r in rows) == {
        (f"d{i}.pdf", p): 1 for i in range(3) for p in range(1, 5)}
    assert all(r["status"] == "ok" for r in rows) and summary.ok == 12


@pytest.mark.parametrize("first,second", [("local", "ray"), ("ray", "local")])
def test_resume_across_engines(cli, tiny_model, local_ray, folder, tmp_path, first, second):
    out = tmp_path / "resume.jsonl"
    part = cli("transcribe", folder, "--out", out, "--engine", first, "--pages", "1", "--model", tiny_model, *FAST)
    assert part.exit_code == 3
    done_first = [r for r in records(out) if r["status"] == "ok"]
    assert len(done_first) == 2  # page 1 of report.pdf and scan.png
    rest = cli("transcribe", folder, "--out", out, "--engine", second, "--model", tiny_model, *FAST)
    assert rest.exit_code == 3
    ok = [(os.path.basename(r["path"]), r["page"]) for r in records(out) if r["status"] == "ok"]
    assert Counter(ok) == {("report.pdf", 1): 1, ("report.pdf", 2): 1, ("report.pdf", 3): 1, ("scan.png", 1): 1}


def test_stdin_is_refused_with_ray(cli, tiny_model, local_ray):
    result = cli("transcribe", "-", "--engine", "ray", "--model", tiny_model, *FAST)
    assert result.exit_code == 2 and "stdin" in result.stderr


def test_a_model_that_cannot_load_is_one_model_error_line_before_ray_starts(cli, tiny_model, folder, tmp_path):
    """As the local engine says it (exit 5), not a traceback per actor and an internal error."""
    other = tmp_path / "llava"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    for model, why in ((tmp_path / "nowhere", "does not exist"), (other, "is a llava model")):
        for engine in ("local", "ray"):
            result = cli("transcribe", folder, "--out", tmp_path / "o.jsonl", "--engine", engine, "--model", model)
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 5 and len(lines) == 1 and why in lines[0], (engine, result.stderr[-2000:])
            assert lines[0].startswith("error [model_error]: ")



def test_each_document_is_opened_and_hashed_once(tiny_model, local_ray, tmp_path):
    """Not once per page: reading and hashing a file a page would cost pages x file size."""
    from idefics_cli.runtime.model import ModelOptions
    from idefics_cli.tasks.batch import walk
    from idefics_cli.tasks.pipeline import TranscribeJob
    from idefics_cli.tasks.ray_engine import run_on_ray as run
    from idefics_cli.tasks.transcription import TranscribeRequest
    from idefics_cli.tasks.writers import JsonlSink

    log = str(tmp_path / "opened.log")

    def counted_open(path):  # defined here, so that Ray ships it by value to its workers
        from idefics_cli.documents import open_document

        with open(log, "a") as f:
            f.write(os.path.basename(path) + "\n")
        return open_document(path, dpi=36)

    make_pdf(tmp_path / "four.pdf", n_pages=4)
    make_image(200, 100, seed=1).save(tmp_path / "one.png")
    docs, _ = walk([str(tmp_path / "four.pdf"), str(tmp_path / "one.png")])
    out = str(tmp_path / "r.jsonl")
    request = TranscribeRequest(tuple(d.path for d in docs), out, ModelOptions(
        model=tiny_model, quant="none", device="cpu", max_new_tokens=2), batch_size=2)
    with JsonlSink(out) as sink:
        job = TranscribeJob(request, docs, sink, counted_open, lambda d: list(range(1, d.page_count + 1)))
        records = list(run(job))
    assert sorted((os.path.basename(r.path), r.page, r.status) for r in records) == [
        ("four.pdf", p, "ok") for p in range(1, 5)] + [("one.png", 1, "ok")]
    assert Counter(open(log).read().split()) == {"four.pdf": 1, "one.png": 1}
    assert job.summary.ok == 5 and job.summary.total == 5


def test_a_model_actor_that_cannot_load_is_a_model_error_line(cli, tiny_model, local_ray, folder, tmp_path):
    """What only the actor finds (8-bit needs a CUDA GPU, and a Ray cluster without one): exit 5 and a one-line
    model_error naming it, not an internal error (Ray keeps only the text of an actor's creation error)."""
    result = cli("transcribe", folder, "--out", tmp_path / "o.jsonl", "--engine", "ray", "--model", tiny_model,
                 *FAST, "--quant", "8bit")
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 5 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("error [model_error]: a Ray model actor could not load the model: ") and "8bit" in last


def test_an_address_that_refuses_is_one_model_error_line_at_once(tiny_model, folder, tmp_path):
    """Ray itself retries an unreachable address for minutes; the run says so within seconds, before Ray starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    res = run_idefics("transcribe", folder, "--out", tmp_path / "o.jsonl", "--engine", "ray", "--ray-address",
                      f"127.0.0.1:{port}", "--model", tiny_model, *FAST, timeout=120)
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 5 and len(lines) == 1, lines
    assert lines[0].startswith(f"error [model_error]: cannot reach Ray at 127.0.0.1:{port}: ")
    assert time.monotonic() - started < 60 and not records(tmp_path / "o.jsonl")  # as a model that cannot load


def test_sigterm_under_ray_exits_130_with_the_pages_done(tiny_model, tmp_path):
    """Ray installs its own SIGTERM handler (exit 15); the run keeps the CLI's: flush, `interrupted`, exit 130.
    The pages done so far are in the records, and the next run does only the rest."""
    docs = tmp_path / "docs"
    docs.mkdir()
    make_pdf(docs / "long.pdf", n_pages=8)
    out = tmp_path / "o.jsonl"
    args = ["transcribe", docs, "--out", out, "--model", tiny_model, "--quant", "none", "--max-new-tokens", "120",
            "--batch-size", "1", "--dpi", "36"]
    proc = subprocess.Popen([sys.executable, "-m", "idefics_cli", *map(str, args), "--engine", "ray"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    rows = records(out)  # every line whole, and each page's record written once done, not at the document's end
    assert 1 <= len(rows) < 8 and all(r["status"] == "ok" for r in rows), len(rows)
    rest = run_idefics(*args, timeout=300)
    assert rest.returncode == 0 and sorted(r["page"] for r in records(out)) == list(range(1, 9))
