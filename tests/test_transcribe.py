"""`idefics transcribe` end to end on the tiny random Idefics2: batches, resume, errors, shards, output safety.

Everything runs the real code paths (walk, documents, prefetch, the model, the sinks and writers); the few
subprocess runs exercise what only a real process shows (piped stdout, SIGKILL, SIGTERM, the lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_image, make_pdf, run_idefics

from idefics_cli.tasks import batch
from idefics_cli.tasks.records import PAGE_SCHEMA, Summary
from idefics_cli.tasks.writers import OutputLock

# CPU float32 everywhere (as the `engine` fixture), so answers are exactly reproducible on any machine;
# tests add --no-split where image splitting is beside the point
FAST = ["--device", "cpu", "--quant", "none", "--max-new-tokens", "6", "--dpi", "72"]
PAGE_FIELDS = {"schema", "path", "page", "pages", "status", "text", "error", "finish_reason", "confidence",
               "warnings", "sha256", "settings", "usage", "timing"}


def model_args(model_dir: str, *extra: str) -> list[str]:
    return ["--model", model_dir, *FAST, *extra]


def read_records(path) -> list[dict]:
    """Every line of a records file, which must be complete (newline-terminated) valid JSON objects."""
    with open(path, "rb") as f:
        data = f.read()
    assert not data or data.endswith(b"\n"), "torn last line"
    records = []
    for line in data.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict)
        records.append(record)
    return records


def ok_keys(records: list[dict]) -> list[tuple]:
    return [(r["path"], r["page"]) for r in records if r["status"] == "ok"]


def md_sections(path) -> list[tuple[int, str]]:
    """(page, text) of each section of a per-document Markdown file written by --out DIR."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"<!-- page (\d+)(:[^>]*)? -->\n", text)
    assert parts[0] == "", text
    sections = []
    for k in range(1, len(parts), 3):
        assert parts[k + 1] is None, f"error section in {path}: {parts[k + 1]}"
        sections.append((int(parts[k]), parts[k + 2].strip()))
    return sections


def noise_image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---- batches ----------------------------------------------------------------------------------------------


def test_batch_of_four_equals_four_single_pages(tmp_path, cli, sharp_model, engine):
    from PIL import Image, ImageDraw

    folder = tmp_path / "in"
    folder.mkdir()
    black = Image.new("RGB", (320, 240), (0, 0, 0))
    ImageDraw.Draw(black).text((20, 20), "Total: 42", fill="white")
    black.save(folder / "a_black.png")
    make_image(200, 400, seed=2).save(folder / "b_form.png")
    noise_image(300, 300, seed=0).save(folder / "c_noise.png")
    red = Image.new("RGB", (520, 260), (230, 20, 20))
    ImageDraw.Draw(red).rectangle([40, 40, 200, 200], fill=(20, 20, 230))
    red.save(folder / "d_red.png")
    # the premise: in one batch these pages are padded to a common pixel size (which the mask must hide)
    images = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())]
    batched = engine.build_inputs([([image], "Transcribe.") for image in images])
    assert not batched["pixel_attention_mask"].all()
    alone = [engine.build_inputs([([image], "Transcribe.")])["pixel_values"].shape[-2:] for image in images]
    assert any(shape != batched["pixel_values"].shape[-2:] for shape in alone)

    common = ["transcribe", folder, *model_args(sharp_model)]
    res4 = cli(*common, "--batch-size", "4", "--out", tmp_path / "b4.jsonl")
    res1 = cli(*common, "--batch-size", "1", "--out", tmp_path / "b1.jsonl")
    assert res4.exit_code == 0 and res1.exit_code == 0, (res4.stderr, res1.stderr)
    four, ones = read_records(tmp_path / "b4.jsonl"), read_records(tmp_path / "b1.jsonl")
    assert len(four) == len(ones) == 4 and all(r["status"] == "ok" for r in four + ones)
    # the four pages were rows of one decode (they share its time: each row's ends at its own last step, and these
    # end together, so they differ by microseconds, rounded); the singles had one decode each
    times = [r["timing"]["generate_s"] for r in four]
    assert max(times) - min(times) <= 0.001 and {r["timing"]["batch_size"] for r in four} == {4}
    by_path = {r["path"]: r for r in ones}
    for r in four:
        single = by_path[r["path"]]
        assert (r["text"], r["finish_reason"], r["usage"]) == (single["text"], single["finish_reason"],
                                                               single["usage"]), r["path"]
    assert len({r["text"] for r in four}) >= 3, "the pages should get different answers for this test to bite"


# ---- resume after crashes --------------------------------------------------------------------------------


def _resume_corpus(root) -> dict[str, tuple[str, int]]:
    """A few documents, 60 pages (enough that 20 kills come before the job is done on a fast machine):
    {source path relative to root: (its .md relative to --out, page count)}."""
    (root / "sub").mkdir(parents=True)
    make_pdf(root / "report.pdf", 46)
    make_pdf(root / "sub" / "letter.pdf", 9, size=(200, 300))
    make_pdf(root / "sub" / "memo.pdf", 4, size=(250, 250))
    make_image(240, 180, seed=7).save(root / "photo.png")
    return {"report.pdf": ("report.md", 46), "sub/letter.pdf": ("sub/letter.md", 9),
            "sub/memo.pdf": ("sub/memo.md", 4), "photo.png": ("photo.md", 1)}


KILLS = 20  # SIGKILLs at random moments of one batch job (issue: at least 20)


def _popen_transcribe(*args) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "idefics_cli", "transcribe", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _line_count(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_lines(path, more_than: int, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until the records file has more than `more_than` lines; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _line_count(path) > more_than:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("no record was written in time")


def _finish(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    return stderr


def test_resume_after_repeated_sigkill_loses_nothing_and_duplicates_nothing(tmp_path, tiny_model, cli):
    docs = _resume_corpus(tmp_path / "in")
    total = sum(pages for _, pages in docs.values())
    out = tmp_path / "out"
    records_path = out / "records.jsonl"
    args = [tmp_path / "in", "--out", out, *model_args(tiny_model, "--batch-size", "2")]
    rng = random.Random(1234)
    first_record_s = None
    kills = rounds = 0
    log = []  # what each round did, for the failure messages
    while kills < KILLS and rounds < KILLS + 10:  # a run that ended before its kill moment does not count
        round_, rounds = rounds, rounds + 1
        before = _line_count(records_path)
        proc = _popen_transcribe(*args)
        started = time.monotonic()
        try:
            if round_ % 3 == 0:  # among the writes: a random moment after the run's first new record
                if _wait_for_lines(records_path, before, proc):
                    first_record_s = time.monotonic() - started  # start-up time, as the machine runs now
                    time.sleep(rng.uniform(0.0, 0.2))
            else:  # a random moment from start-up (loading, lock, rendering) to the first writes
                time.sleep(rng.uniform(0.2, 1.1 * first_record_s))
            kills += proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            stderr = _finish(proc)
        log.append(f"round {round_}: killed at {time.monotonic() - started:.1f}s, rc {proc.returncode}, "
                   f"lines {before} -> {_line_count(records_path)}")
        assert "Traceback" not in stderr, (log, stderr)
        if records_path.exists():
            read_records_tolerant(records_path)  # only the last line may be torn
    assert kills == KILLS and _line_count(records_path) > 0, log

    final = cli("transcribe", *args)  # in-process: the same code, without paying for another start-up
    assert final.exit_code == 0, (log, final.stderr)
    records = read_records(records_path)
    keys = ok_keys(records)
    assert len(keys) == len(set(keys)) == total, ("exactly one ok record per page", log, final.stderr)
    assert all(r["status"] == "ok" for r in records)
    assert sorted(keys) == sorted((str(tmp_path / "in" / src), page) for src, (_, pages) in docs.items()
                                  for page in range(1, pages + 1))
    for md, pages in docs.values():
        sections = md_sections(out / md)
        assert [page for page, _ in sections] == list(range(1, pages + 1)), md
        assert all(text for _, text in sections), md


def read_records_tolerant(path) -> list[dict]:
    """After a SIGKILL only the last line may be torn; every line before it must be valid JSON."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def _three_pages_done(tmp_path, cli, tiny_model):
    """A 3-page PDF transcribed into a folder: (the command's args, the folder, its records file)."""
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "doc.pdf", 3)
    out = tmp_path / "out"
    args = ["transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split")]
    assert cli(*args).exit_code == 0
    return args, out, out / "records.jsonl"


def test_torn_last_line_is_dropped_and_its_page_redone(tmp_path, cli, tiny_model):
    args, out, records_path = _three_pages_done(tmp_path, cli, tiny_model)
    lines = records_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    torn_page = json.loads(lines[-1])["page"]
    # a crash in the middle of the last write: the line is there only in part, without its newline
    records_path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])

    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert "1 pages transcribed, 2 already done" in res.stderr
    records = read_records(records_path)
    assert len(records) == 3 and sorted(r["page"] for r in records) == [1, 2, 3]
    assert records[-1]["page"] == torn_page and records[-1]["status"] == "ok"
    assert [page for page, _ in md_sections(out / "doc.md")] == [1, 2, 3]


def test_hand_edited_records_that_are_not_page_records_are_redone(tmp_path, cli, tiny_model):
    """A records file edited by hand before resuming: a page given as "2", a text set to null (and a blank line, a
    line of garbage) ended the run with an internal error as the .md was written; such records are not trusted, so
    their pages are done again."""
    args, out, records_path = _three_pages_done(tmp_path, cli, tiny_model)
    first, second, third = read_records(records_path)
    edited = [{**first, "text": None}, {**second, "page": str(second["page"])}, third]
    records_path.write_text("\n".join([*map(json.dumps, edited), "", "garbage{", "[1]"]) + "\n")

    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert "2 pages transcribed, 1 already done" in res.stderr
    sections = md_sections(out / "doc.md")
    assert [page for page, _ in sections] == [1, 2, 3] and all(text for _, text in sections)


def test_identical_files_both_get_their_markdown_on_resume(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "a.pdf", 2)
    (folder / "copy.pdf").write_bytes((folder / "a.pdf").read_bytes())
    out = tmp_path / "out"
    args = ["transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split")]
    for _ in range(2):  # the second run skips every page (same bytes, same settings)
        res = cli(*args)
        assert res.exit_code == 0, res.stderr
        for name in ("a.md", "copy.md"):
            assert [page for page, _ in md_sections(out / name)] == [1, 2]
    assert "0 pages transcribed, 4 already done" in res.stderr


# ---- bad inputs ------------------------------------------------------------------------------------------


def _bad_files(folder) -> dict[str, str]:
    import pymupdf

    folder.mkdir(parents=True, exist_ok=True)
    full = make_pdf(folder / "whole.tmp", 2)
    (folder / "broken.pdf").write_bytes(open(full, "rb").read()[:100])
    os.unlink(full)
    doc = pymupdf.open()
    doc.new_page(width=200, height=150).insert_text((20, 40), "secret")
    doc.save(str(folder / "locked.pdf"), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    doc.close()
    (folder / "notes.pdf").write_text("just some notes, not a document, whatever its name says\n")
    (folder / "notes.txt").write_text("just some notes: not a document, so the walk skips it\n")
    return {"broken.pdf": "corrupt", "locked.pdf": "encrypted", "notes.pdf": "unsupported_format"}


def test_bad_files_get_one_error_record_each_and_partial_exit(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    bad = _bad_files(folder)
    make_pdf(folder / "good.pdf", 2)
    make_image(200, 150, seed=1).save(folder / "good.png")
    res = cli("transcribe", folder, "--out", tmp_path / "r.jsonl", *model_args(tiny_model, "--no-split"))
    assert res.exit_code == 3, res.stderr
    records = read_records(tmp_path / "r.jsonl")
    errors = {os.path.basename(r["path"]): r for r in records if r["status"] == "error"}
    assert {name: r["error"]["code"] for name, r in errors.items()} == bad
    assert len([r for r in records if r["status"] == "error"]) == len(bad)
    for r in errors.values():
        assert r["text"] is None and r["finish_reason"] is None and r["error"]["message"]
    assert sorted(ok_keys(records)) == [(str(folder / "good.pdf"), 1), (str(folder / "good.pdf"), 2),
                                        (str(folder / "good.png"), 1)]
    assert "3 failed" in res.stderr and "Traceback" not in res.stderr


def test_only_bad_files_exit_4(tmp_path, cli, tiny_model):
    folder = tmp_path / "bad"
    bad = _bad_files(folder)
    res = cli("transcribe", folder, "--out", tmp_path / "r.jsonl", *model_args(tiny_model, "--no-split"))
    assert res.exit_code == 4, res.stderr
    records = read_records(tmp_path / "r.jsonl")
    assert sorted(r["error"]["code"] for r in records) == sorted(bad.values())
    assert all(r["status"] == "error" for r in records)


def test_summary_lists_every_failure_or_says_how_many_more_and_where(tmp_path, cli, tiny_model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(23):
        (folder / f"broken-{i:02}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    make_image(200, 150, seed=1).save(folder / "good.png")
    res = cli("transcribe", folder, "--out", tmp_path / "r.jsonl", *model_args(tiny_model, "--no-split"))
    assert res.exit_code == 3, res.stderr
    failed = [line for line in res.stderr.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 20
    assert res.stderr.splitlines()[-1] == f"  and 3 more (see {tmp_path / 'r.jsonl'})"
    few = Summary(failures=["a.pdf page 0: corrupt"] * 3)
    assert few.failure_lines("r.jsonl") == ["  failed: a.pdf page 0: corrupt"] * 3
    nowhere = Summary(failures=["a.pdf page 0: corrupt"] * 25)
    assert len(nowhere.failure_lines(None)) == 25  # nowhere else to look: all of them


def test_a_failed_file_whose_name_holds_a_newline_is_one_summary_line():
    """Each failed page is one line of the summary, as an error line is: a newline in a file name is a space."""
    from idefics_cli.tasks.records import PageRecord

    summary = Summary()
    summary.add(PageRecord("scans/bad\nname.png", 0, 0, "error", "", "s", error={"code": "corrupt", "message": "x"}))
    assert summary.failure_lines(None) == ["  failed: scans/bad name.png page 0: corrupt"]


# ---- shards ----------------------------------------------------------------------------------------------


def test_shard_option_splits_a_run(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        make_image(96 + 8 * k, 80, seed=k).save(folder / f"img{k}.png")
    seen = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        res = cli("transcribe", folder, "--shard", f"{i}/3", "--out", out,
                  *model_args(tiny_model, "--no-split", "--max-new-tokens", "1"))
        assert res.exit_code == 0, res.stderr
        paths = [r["path"] for r in read_records(out)] if out.exists() else []
        assert all(batch.in_shard(os.path.basename(p), i, 3) for p in paths)
        seen.extend(paths)
    assert sorted(seen) == sorted(str(folder / f"img{k}.png") for k in range(6))
    res = cli("transcribe", folder, "--shard", "3/3", *model_args(tiny_model))
    assert res.exit_code == 2 and "--shard" in res.stderr
    out = tmp_path / "unset.jsonl"  # `--shard "$SHARD"` with SHARD unset: one usage line, nothing transcribed
    res = cli("transcribe", folder, "--shard", "", "--out", out, *model_args(tiny_model))
    assert res.exit_code == 2 and res.stderr.startswith("error [usage]: --shard is empty") and not out.exists()


# ---- stdout ----------------------------------------------------------------------------------------------


def test_piped_stdout_is_only_page_jsonl(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "doc.pdf", 2)
    make_image(200, 150, seed=3).save(folder / "pic.png")
    (folder / "readme.pdf").write_text("not a document, whatever its name says")
    res = run_idefics("transcribe", folder, *model_args(tiny_model))
    assert res.returncode == 3, res.stderr.decode(errors="replace")
    stdout = res.stdout.decode("utf-8")
    assert stdout.endswith("\n")
    records = [json.loads(line) for line in stdout.splitlines()]  # nothing but JSON lines
    assert len(records) == 4
    for r in records:
        assert set(r) == PAGE_FIELDS and r["schema"] == PAGE_SCHEMA
        assert isinstance(r["path"], str) and isinstance(r["page"], int) and isinstance(r["pages"], int)
        assert re.fullmatch(r"[0-9a-f]{4,64}", r["settings"])
        assert isinstance(r["usage"], dict) and isinstance(r["timing"], dict)
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        with open(r["path"], "rb") as f:
            assert r["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert isinstance(r["text"], str) and r["error"] is None and r["finish_reason"] in ("stop", "length")
        assert set(r["usage"]) == {"prompt_tokens", "image_tokens", "completion_tokens"}
        assert r["usage"]["image_tokens"] == 320 and r["usage"]["prompt_tokens"] > 320
        assert 1 <= r["usage"]["completion_tokens"] <= 6
        assert set(r["timing"]) == {"preprocess_s", "generate_s", "batch_size"} and r["warnings"] == []
        assert isinstance(r["timing"]["generate_s"], float) and r["timing"]["batch_size"] >= 1
    assert sorted((os.path.basename(r["path"]), r["page"], r["pages"]) for r in ok) == [
        ("doc.pdf", 1, 2), ("doc.pdf", 2, 2), ("pic.png", 1, 1)]
    (err,) = [r for r in records if r["status"] == "error"]
    assert err["text"] is None and err["finish_reason"] is None
    assert err["error"]["code"] == "unsupported_format" and err["error"]["message"]
    stderr = res.stderr.decode()
    assert "pages transcribed" in stderr and "Traceback" not in stderr
    assert "pages transcribed" not in stdout


# ---- names and output paths ------------------------------------------------------------------------------


def test_odd_file_names_get_their_markdown_inside_out(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    (folder / "données").mkdir(parents=True)
    make_pdf(folder / "my scan 1.pdf", 2)
    make_image(160, 120, seed=4).save(folder / "é文件.png")
    make_image(120, 160, seed=5).save(folder / "données" / "reçu 2.png")
    odd = os.fsdecode(b"bad\xffname.png")
    make_image(100, 100, seed=6).save(os.path.join(folder, odd))
    out = tmp_path / "out"
    res = cli("transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split"))
    assert res.exit_code == 0, res.stderr
    mds = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files
                 if f.endswith(".md"))
    assert mds == sorted(["my scan 1.md", "é文件.md", os.path.join("données", "reçu 2.md"), "bad\ufffdname.md"])
    assert [page for page, _ in md_sections(out / "my scan 1.md")] == [1, 2]
    records = read_records(out / "records.jsonl")
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    assert os.path.join(str(folder), odd) in {r["path"] for r in records}  # the JSON keeps the real name
    assert not any(name.startswith(".tmp-") for _, _, files in os.walk(out) for name in files)


# ---- force, lock, signals --------------------------------------------------------------------------------


def test_force_redoes_done_pages_and_plain_rerun_skips(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "doc.pdf", 2)
    make_image(160, 120, seed=8).save(folder / "pic.png")
    out = tmp_path / "out.jsonl"
    args = ["transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split")]
    assert cli(*args).exit_code == 0
    first = read_records(out)
    assert len(first) == 3

    res = cli(*args)
    assert res.exit_code == 0 and "0 pages transcribed, 3 already done" in res.stderr
    assert read_records(out) == first

    res = cli(*args, "--force")
    assert res.exit_code == 0 and "3 pages transcribed, 0 already done" in res.stderr
    records = read_records(out)
    assert len(records) == 6 and records[:3] == first
    assert sorted(ok_keys(records)) == sorted(ok_keys(first) * 2)
    assert [r["text"] for r in records[3:]] == [r["text"] for r in first]  # greedy: the same answers

    res = cli(*args)
    assert res.exit_code == 0 and "0 pages transcribed, 3 already done" in res.stderr
    assert len(read_records(out)) == 6


@pytest.mark.parametrize("kind", ["folder", "jsonl"])
def test_second_writer_is_refused_while_the_output_is_locked(tmp_path, tiny_model, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    make_image(120, 90, seed=1).save(folder / "pic.png")
    out = tmp_path / ("out" if kind == "folder" else "out.jsonl")
    records = out / "records.jsonl" if kind == "folder" else out
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_bytes(b'{"schema": "idefics-cli.page/1"}\n')
    with OutputLock(str(records) + ".lock"):
        res = run_idefics("transcribe", folder, "--out", out, *model_args(tiny_model), timeout=120)
    stderr = res.stderr.decode()
    assert res.returncode == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "another idefics process is writing to" in stderr and str(records) in stderr
    assert res.stdout == b""
    assert records.read_bytes() == b'{"schema": "idefics-cli.page/1"}\n'  # untouched


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_exits_130_with_complete_records(tmp_path, cli, tiny_model, sig):
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "long.pdf", 6)
    out = tmp_path / "out"
    records_path = out / "records.jsonl"
    # long answers, so that the signal lands mid-run however fast the pages' (alike, blank) tiles are encoded
    args = [folder, "--out", out, *model_args(tiny_model, "--batch-size", "1", "--max-new-tokens", "120")]
    proc = _popen_transcribe(*args)
    try:
        assert _wait_for_lines(records_path, 0, proc), "the run ended before its first record"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    records = read_records(records_path)
    assert 1 <= len(records) < 6 and all(r["status"] == "ok" for r in records)

    res = cli("transcribe", *args)  # and the next run finishes the job
    assert res.exit_code == 0, res.stderr
    records = read_records(records_path)
    assert sorted(r["page"] for r in records) == list(range(1, 7))
    assert [page for page, _ in md_sections(out / "long.md")] == list(range(1, 7))


def test_small_max_new_tokens_gives_finish_reason_length(tmp_path, cli, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "doc.pdf", 2)
    res = cli("transcribe", folder, *model_args(tiny_model, "--no-split"), "--max-new-tokens", "2")
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2 and r["text"]


def test_files_a_folder_holds_that_are_not_documents_are_skipped_not_failed(tmp_path, cli, tiny_model):
    """samples/ with README.md and make_samples.py: exit 0, no error record, the summary counts them skipped."""
    folder = tmp_path / "samples"
    folder.mkdir()
    make_image(160, 120, seed=2).save(folder / "receipt.png")
    (folder / "README.md").write_text("# Samples\n")
    (folder / "make_samples.py").write_text("print('hello')\n")
    out = tmp_path / "out"
    args = ["transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split")]
    for _ in range(2):  # a rerun adds nothing either
        res = cli(*args)
        assert res.exit_code == 0, res.stderr
        assert "0 failed, 2 files skipped (not documents)" in res.stderr
        records = read_records(out / "records.jsonl")
        assert [(os.path.basename(r["path"]), r["status"]) for r in records] == [("receipt.png", "ok")]
    assert sorted(os.listdir(out)) == ["receipt.md", "records.jsonl"]
    # named explicitly, a file that is not a document stays an error
    res = cli("transcribe", folder / "README.md", "--out", tmp_path / "r.jsonl", *model_args(tiny_model))
    assert res.exit_code == 4 and "unsupported_format" in res.stderr


# ---- --out ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["parent_is_a_file", "parent_is_a_file_jsonl", "proc", "proc_jsonl", "sys"])
def test_unwritable_out_is_an_output_error_before_the_model_loads(tmp_path, tiny_model, where):
    from conftest import run_traced

    make_image(120, 90, seed=1).save(tmp_path / "pic.png")
    (tmp_path / "a-file").write_text("x")
    out = {"parent_is_a_file": tmp_path / "a-file" / "out", "parent_is_a_file_jsonl": tmp_path / "a-file" / "r.jsonl",
           "proc": "/proc/idefics-out", "proc_jsonl": "/proc/self/r.jsonl", "sys": "/sys/idefics-out"}[where]
    res, imported = run_traced("transcribe", tmp_path / "pic.png", "--out", out, *model_args(tiny_model),
                               tmp_path=tmp_path)
    stderr = res.stderr.decode()
    assert res.returncode == 4, stderr
    assert stderr.startswith("error [output_error]: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert str(out) in stderr and res.stdout == b""
    assert imported == []  # found before the model (torch, transformers) loads


@pytest.mark.parametrize("out", ["result.txt", "notes.md", "a-file"])
def test_out_that_is_neither_jsonl_nor_a_folder_is_a_usage_error(tmp_path, cli, tiny_model, out):
    make_image(120, 90, seed=1).save(tmp_path / "pic.png")
    (tmp_path / "a-file").write_text("keep me")
    res = cli("transcribe", tmp_path / "pic.png", "--out", tmp_path / out, *model_args(tiny_model))
    assert res.exit_code == 2, res.stderr
    assert "neither a .jsonl file nor a folder" in res.stderr and "--out pages.jsonl" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["a-file", "pic.png"]
    assert (tmp_path / "a-file").read_text() == "keep me"
    # a dotted folder name is a folder when it ends with / (or exists as one)
    res = cli("transcribe", tmp_path / "pic.png", "--out", f"{tmp_path / 'out.v2'}/", *model_args(tiny_model))
    assert res.exit_code == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "out.v2")) == ["pic.md", "records.jsonl"]


def test_rerun_with_nothing_left_to_do_never_imports_torch(tmp_path, cli, tiny_model):
    from conftest import run_traced

    folder = tmp_path / "in"
    folder.mkdir()
    make_pdf(folder / "doc.pdf", 2)
    make_image(160, 120, seed=8).save(folder / "pic.png")
    out = tmp_path / "out"
    args = ["transcribe", folder, "--out", out, *model_args(tiny_model, "--no-split")]
    assert cli(*args).exit_code == 0
    first = read_records(out / "records.jsonl")
    os.unlink(out / "doc.md")  # rebuilt from the records, still without the model
    res, imported = run_traced(*args, tmp_path=tmp_path)
    stderr = res.stderr.decode()
    assert res.returncode == 0, stderr
    assert imported == []
    assert "nothing left to do" in stderr and "0 pages transcribed, 3 already done" in stderr
    assert read_records(out / "records.jsonl") == first and md_sections(out / "doc.md")
    # a document that cannot be read is tried again (and fails again) without the model too
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage")
    res, imported = run_traced(*args, tmp_path=tmp_path)
    assert res.returncode == 3 and imported == [], res.stderr.decode()
    assert [r["error"]["code"] for r in read_records(out / "records.jsonl")[3:]] == ["corrupt"]
    # a new page to do loads the model
    make_image(160, 120, seed=9).save(folder / "new.png")
    res, imported = run_traced(*args, tmp_path=tmp_path)
    assert res.returncode == 3 and imported == ["torch", "transformers"], res.stderr.decode()
    assert "1 pages transcribed, 3 already done, 1 failed" in res.stderr.decode()
