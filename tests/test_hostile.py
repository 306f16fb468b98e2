"""Hostile inputs: every broken, odd or malicious file gets its documented code, and nothing runs or leaks."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from hostile import build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idefics_cli.documents import open_document
from idefics_cli.errors import EXIT_FOR_CODE, INPUT_CODES, IdeficsError

FAST = ["--quant", "none", "--max-new-tokens", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    cases = build(root)
    assert len(cases) >= 40
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDEFICS_DECODE_TIMEOUT", "5")  # slow-render.pdf is given up after 5 s, not 30
        yield cases


def test_corpus_has_forty_cases_and_every_kind(corpus):
    names = {c.name for c in corpus}
    assert len(corpus) >= 40
    assert {"bomb.png", "cmyk.jpg", "animated.gif", "multi-frame.tiff", "symlink-loop", "many-pages.pdf",
            "javascript-attachment.pdf", "folder-named-pdf", "non-utf8", "newline"} <= names


def _expected(case, got: str) -> bool:
    return got == case.code if isinstance(case.code, str) else got in case.code


def test_ask_reports_each_case_with_its_code(cli, tiny_model, corpus):
    failures = []
    for case in corpus:
        dpi = [] if "--dpi" in case.extra else ["--dpi", "36"]
        result = cli("ask", case.path, "What is written here?", *dpi, "--model", tiny_model, *FAST, *case.extra)
        lines = result.stderr.strip().splitlines()
        if result.exit_code == 0:
            got = "ok"
            if result.stdout.count("\n") != 1:
                failures.append((case.name, "answer", result.stdout))
            # stderr holds one note per warning of a page read, and nothing else
            noted = {m.group(1) for line in lines if (m := re.search(r" page \d+: (\w+) \(", line))}
            if isinstance(case.code, str) and noted != set(case.warnings) or any(
                    not line.startswith("warning: ") for line in lines):
                failures.append((case.name, "stderr", case.warnings, result.stderr))
        else:
            got = lines[0].split("]")[0].removeprefix("error [") if lines else "?"
            if len(lines) != 1 or result.exit_code != EXIT_FOR_CODE.get(got) or result.stdout:
                failures.append((case.name, result.exit_code, result.stderr))
            shown = os.path.basename(case.path).replace("\n", " ")
            if got in INPUT_CODES and shown.encode("utf-8", "replace") and shown[:3] not in lines[0]:
                failures.append((case.name, "file not named", lines[0]))
        if "Traceback" in result.stderr or not _expected(case, got):
            failures.append((case.name, got, case.code, result.stderr[-300:]))
    assert not failures, failures


def test_transcribe_records_each_case_and_goes_on(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "out"
    folder = os.path.dirname(corpus[0].path)
    big = next(c for c in corpus if c.name == "many-pages.pdf")
    aside = str(tmp_path / "many-pages.pdf")
    os.rename(big.path, aside)  # 10,000 pages belong to the --pages -1 case, not to this run
    try:
        result = cli("transcribe", folder, "--out", out, "--model", tiny_model, "--dpi", "36", "-q", *FAST)
    finally:
        os.rename(aside, big.path)
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in open(out / "records.jsonl")]
    by_file: dict[str, list[dict]] = {}
    for record in records:
        by_file.setdefault(os.path.basename(record["path"]), []).append(record)
    for case in corpus:
        name = os.path.basename(case.path)
        if case.name in ("missing", "name-too-long", "folder-named-pdf", "many-pages.pdf"):  # not in the folder
            continue
        rows = by_file.get(name)
        assert rows, f"no record for {case.name}"
        if "--pages" in case.extra:
            continue  # its code is for the chosen pages only
        if case.name == "page-tree-cycle.pdf":  # page 1 is reachable, pages 2 and 3 sit in the cycle
            got = sorted((r["page"], r["error"]["code"] if r["error"] else "ok") for r in rows)
            assert got == [(1, "ok"), (2, "corrupt"), (3, "corrupt")], got
            continue
        code = "encrypted" if "--password" in case.extra and case.code != "corrupt" else case.code
        got = {r["error"]["code"] if r["status"] == "error" else "ok" for r in rows}
        assert all(_expected(type(case)(case.name, case.path, code), g) for g in got), (case.name, got)
        for record in rows:
            if record["status"] == "ok" and isinstance(case.code, str):
                assert record["warnings"] == list(case.warnings), (case.name, record)
            if "blank_page" in case.warnings:
                assert record["text"] == "" and record["usage"]["completion_tokens"] == 0
        if "error" in {r["status"] for r in rows} and code != "ok":
            assert len(rows) == 1 and rows[0]["text"] is None
    assert len(by_file["multi-frame.tiff"]) == 3 and len(by_file["animated.gif"]) == 1
    assert len(by_file["burst.heic"]) == 2 and len(by_file["comic.cbz"]) == 2 and len(by_file["animated.avif"]) == 1
    leftovers = [n for _, _, files in os.walk(out) for n in files if n.startswith(".tmp")]
    assert not leftovers
    for md in (p for p in out.rglob("*.md")):
        assert str(md.resolve()).startswith(str(out.resolve()))


def test_pages_come_out_with_the_pixels_the_file_holds(corpus):
    checked = [c for c in corpus if c.check]
    assert {"cut-last-chunk.png", "twelve-bit.tif", "int32-sixteen-bit.tif", "sixteen-bit.pgm",
            "layers.psd"} <= {c.name for c in checked}
    for case in checked:
        with open_document(case.path) as doc:
            assert case.check(doc.render(1)), case.name


def test_ten_thousand_page_pdf_last_page_only(cli, tiny_model, corpus):
    big = next(c for c in corpus if c.name == "many-pages.pdf")
    result = cli("ask", big.path, "--pages=-1", "What is on it?", "--json", "--model", tiny_model, *FAST)
    answer = json.loads(result.stdout)
    assert answer["sources"][0]["pages"] == [10_000] and answer["usage"]["image_tokens"] == 320


def test_javascript_and_attachments_are_never_run_or_extracted(cli, tiny_model, corpus, tmp_path, monkeypatch):
    case = next(c for c in corpus if c.name == "javascript-attachment.pdf")
    monkeypatch.chdir(tmp_path)
    if os.path.exists("/tmp/idefics-pwned"):
        os.unlink("/tmp/idefics-pwned")
    result = cli("transcribe", case.path, "--out", tmp_path / "o", "--model", tiny_model, "-q", *FAST)
    assert result.exit_code == 0
    assert not os.path.exists("/tmp/idefics-pwned")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["o/javascript-attachment.md", "o/records.jsonl"]


def test_huge_page_rendered_within_pixel_budget(corpus):
    from idefics_cli.documents import MAX_PIXELS

    for name, dpi in (("huge-page.pdf", 300), ("a0-page.pdf", 600), ("a0-page.pdf", None)):
        case = next(c for c in corpus if c.name == name)
        with open_document(case.path, dpi=dpi) as doc:
            image = doc.render(1)
        assert image.width * image.height <= MAX_PIXELS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048),
                 st.sampled_from([b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00",
                                  b"RIFF\x00\x00\x00\x00WEBP", b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                                  b"(\x00\x00\x00"]).flatmap(lambda head: st.binary(max_size=1024).map(
                                      lambda tail: head + tail))))
def test_random_bytes_open_to_a_result_or_a_documented_error(data):
    try:
        with open_document("fuzz.bin", data=data) as doc:
            assert doc.page_count >= 1
            image = doc.render(1)
            assert image.mode == "RGB"
    except IdeficsError as err:
        assert err.code in INPUT_CODES, err.code
        assert "\n" not in err.one_line()


def test_transcribe_to_a_full_disk_is_a_clear_error(tiny_model, tmp_path):
    import subprocess
    import sys

    from conftest import make_image

    make_image().save(tmp_path / "p.png")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "idefics_cli", "transcribe", str(tmp_path / "p.png"),
                                 "--model", tiny_model, "-q", *FAST], stdout=full, stderr=subprocess.PIPE,
                                timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4, lines
    assert lines == ["error [output_error]: cannot write to stdout: No space left on device"]


def test_stderr_holds_one_line_per_error_and_nothing_else(tiny_model, corpus):
    """No libtiff text on fd 2, no Pillow UserWarning, no bitsandbytes log line; IDEFICS_DEBUG=1 shows them all."""
    from conftest import run_idefics

    path = {c.name: c.path for c in corpus}
    args = ["--model", tiny_model, "--quant", "4bit", "--max-new-tokens", "1", "--json"]
    broken = run_idefics("ask", path["libtiff-error.tif"], "What?", *args)
    assert broken.returncode == 4
    assert broken.stderr.decode().splitlines() == [
        f"error [corrupt]: {path['libtiff-error.tif']}: page 1 could not be decoded (OSError: decoder error -2)"]
    spp = run_idefics("ask", path["samples-per-pixel.tif"], "What?", *args)
    assert spp.stderr.decode().splitlines() == [
        f"error [corrupt]: {path['samples-per-pixel.tif']}: not a readable TIFF image"], spp.stderr.decode()
    fine = run_idefics("ask", path["corrupt-exif.jpg"], "What?", *args)
    assert fine.returncode == 0 and fine.stderr == b"", fine.stderr.decode()
    noisy = run_idefics("ask", path["corrupt-exif.jpg"], "What?", *args, env={"IDEFICS_DEBUG": "1"})
    text = noisy.stderr.decode()
    assert "UserWarning: Corrupt EXIF data" in text, text
    import subprocess
    import sys

    bnb = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, timeout=120)
    if b"gemm_4bit_forward" in bnb.stderr:  # logged on import on CPUs with AVX512-BF16 and no `kernels` package
        assert "gemm_4bit_forward" in text, text
    noisy = run_idefics("ask", path["libtiff-error.tif"], "What?", *args, env={"IDEFICS_DEBUG": "1"})
    assert "PackBitsDecode: Not enough data" in noisy.stderr.decode()


def test_every_new_format_reads_and_each_variant_is_named(corpus):
    """The formats of issue 28 open, page count as expected; the well-formed variants name themselves."""
    by_name = {c.name: c for c in corpus}
    pages = {"jpeg2000.jp2": 1, "codestream.j2k": 1, "sixteen-bit.pgm": 1, "netpbm.pbm": 1, "photo.avif": 1,
             "photo.heic": 1, "burst.heic": 2, "layers.psd": 1, "book.epub": 1, "comic.cbz": 2, "paper.xps": 1,
             "paper.oxps": 1, "book.mobi": 1, "book.fb2": 1, "drawing.svg": 1, "thunderscan.tif": 1}
    for name, count in pages.items():
        with open_document(by_name[name].path) as doc:
            assert doc.page_count == count, name
            assert doc.render(count).mode == "RGB"
    named = {"twelve-bit.jpg": "12-bit JPEG is not supported", "lossless.jpg": "lossless JPEG (SOF3) is not supported",
             "float64.tif": "64-bit float TIFF is not supported", "logluv.tif": "LogLuv TIFF is not supported",
             "os2-rle24.bmp": "OS/2 BMP with 24-bit RLE is not supported",
             "bitfields.bmp": "BMP with unusual bit-field masks is not supported",
             "large-document.psb": "PSB (Photoshop's large document format) is not supported",
             "psb-named.psd": "PSB (Photoshop's large document format) is not supported"}
    for name, message in named.items():
        with pytest.raises(IdeficsError) as err:
            open_document(by_name[name].path).render(1)
        assert (err.value.code, err.value.message) == ("unsupported_format", message)


def test_a_decoder_past_its_bound_is_corrupt_and_the_run_goes_on(cli, tiny_model, tmp_path, monkeypatch):
    """IDEFICS_DECODE_TIMEOUT (default 30 s): a file slower to decode than that is `corrupt`, saying so."""
    from PIL import Image

    big = Image.linear_gradient("L").resize((4000, 4000)).convert("RGB")  # seconds to decode
    big.save(tmp_path / "slow.jp2", "JPEG2000")
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "quick.png")
    monkeypatch.setenv("IDEFICS_DECODE_TIMEOUT", "0.25")
    with open_document(str(tmp_path / "slow.jp2")) as doc:
        with pytest.raises(IdeficsError) as err:
            doc.render(1)
        assert err.value.code == "corrupt" and "took longer than 0.25 s" in err.value.message
        with pytest.raises(IdeficsError, match="took longer than 0.25 s"):  # tried again in a fresh worker
            doc.render(1)
    result = cli("transcribe", tmp_path, "--out", tmp_path / "out", "--model", tiny_model, "-q", *FAST)
    records = {os.path.basename(r["path"]): r for r in map(json.loads, open(tmp_path / "out" / "records.jsonl"))}
    assert result.exit_code == 3
    assert records["slow.jp2"]["error"]["code"] == "corrupt" and records["quick.png"]["status"] == "ok"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/quick.md", "out/records.jsonl", "out/slow.md", "quick.png", "slow.jp2"]  # within --out


def test_a_mupdf_render_past_its_bound_is_killed_and_the_next_document_renders(corpus, monkeypatch):
    """MuPDF holds the GIL in C: the page is rendered in a worker process, killed at the bound (not waited on)."""
    from idefics_cli.documents import worker

    by_name = {c.name: c for c in corpus}
    monkeypatch.setenv("IDEFICS_DECODE_TIMEOUT", "1")
    with open_document(by_name["slow-render.pdf"].path) as doc:
        started = time.monotonic()
        with pytest.raises(IdeficsError) as err:
            doc.render(1)
        took = time.monotonic() - started
    assert (err.value.code, err.value.message) == ("corrupt", "page 1 could not be decoded: it took longer than 1 s, "
                                                   "given up")
    assert took < 4, took  # the render alone takes minutes
    monkeypatch.delenv("IDEFICS_DECODE_TIMEOUT")  # 30 s again: the next files need no race with a busy machine
    assert all(w.proc.poll() is None for w in worker._alive)  # the killed worker is gone, not left running
    for name in ("xfa-form.pdf", "repaired.pdf", "book.epub"):  # the same run goes on, warnings and all
        with open_document(by_name[name].path) as doc:
            assert doc.render(1).mode == "RGB" and set(by_name[name].warnings) <= set(doc.warnings(1))
