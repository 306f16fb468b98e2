"""The shared real-world corpus (../shared/corpus/realworld, 115 files from pdf.js, qpdf, pypdf, PyMuPDF and Pillow):
every file gives the code or warning expected of it, with no traceback, no exit 1 and no stray stderr line."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import run_idefics

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "corpus")
REALWORLD = os.path.join(ROOT, "realworld")
# manifest category or file -> the code its pages or its error record must carry ("ok": every chosen page read)
ERRORS = {
    "mu__test_open2.docx": "unsupported_format", "pil__test-ole-file.doc": "unsupported_format",
    "qpdf__bad1.pdf": "unsupported_format", "qpdf__fuzz-16214.pdf": "unsupported_format",
    "qpdf__issue-141a.pdf": "unsupported_format", "qpdf__issue-147.pdf": "unsupported_format",
    "qpdf__issue-335b.pdf": "unsupported_format",
    "qpdf__empty.pdf": "empty_document", "qpdf__c-empty.pdf": "empty_document",
    "pdfjs__GHOSTSCRIPT-698804-1-fuzzed.pdf": "corrupt", "pdfjs__REDHAT-1531897-0.pdf": "corrupt",
    "pdfjs__bug1020226.pdf": "corrupt", "pdfjs__issue15590.pdf": "corrupt", "pdfjs__issue9105_other.pdf": "corrupt",
    "pdfjs__poppler-85140-0.pdf": "corrupt", "pdfjs__poppler-937-0-fuzzed.pdf": "corrupt",
    "sf__017-unreadable-meta-data__unreadablemetadata.pdf": "corrupt", "pil__broken.png": "corrupt",
    "pil__libtiff_segfault.tif": "corrupt", "pil__oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif": "corrupt",
    "pil__zero_width.gif": "corrupt",
    "pil__decompression_bomb.gif": "image_too_large",
    "pdfjs__issue3371.pdf": "encrypted", "pdfjs__issue6010_1.pdf": "encrypted", "pdfjs__print_protection.pdf":
    "encrypted", "pdfjs__saslprep-r6.pdf": "encrypted", "qpdf__enc-XI-R6,V5,U=view,O=master.pdf": "encrypted",
    "qpdf__encrypted-40-bit-R3.pdf": "encrypted", "qpdf__bad-encryption-length.pdf": "encrypted",
    "sf__005-libreoffice-writer-password__libreoffice-writer-password.pdf": "encrypted",
}
PAGE_ERRORS = {"pdfjs__Pages-tree-refs.pdf": {1: "ok", 2: "corrupt"},  # page 2 sits in a cycle of the page tree
               "pil__truncated_image.png": {1: "corrupt"}, "pil__truncated_jpeg.jpg": {1: "corrupt"},
               "pil__ultrahdr.jpg": {1: "corrupt"}}  # cut short in Pillow's test suite: the scan data ends early
WARNINGS = {"pdfjs__xfa_filled_imm1344e.pdf": "xfa_form", "pdfjs__xfa_issue14315.pdf": "xfa_form",
            "pil__chi.gif": "first_frame_only", "pil__sugarshack.mpo": "first_frame_only",
            "pil__apng__mode_16bit.png": "first_frame_only", "pdfjs__helloworld-bad.pdf": "repaired",
            "qpdf__bad-xref.pdf": "repaired", "pdfjs__empty.pdf": "blank_page"}


@pytest.mark.skipif(not os.path.isdir(REALWORLD), reason="../shared/corpus/realworld is not here (the shared corpus)")
def test_realworld_corpus_gives_its_codes_and_nothing_else(tiny_model, tmp_path):
    names = sorted(os.listdir(REALWORLD))
    manifest = [line.split("\t")[0] for line in open(os.path.join(ROOT, "realworld-MANIFEST.tsv"))][1:]
    assert sorted(manifest) == names and len(names) == 115
    start = time.monotonic()
    paths = [os.path.join(REALWORLD, n) for n in names]  # named one by one: a folder walk skips non-documents
    # pages render at full size as in any run; --no-split sends one image a page to the tiny model, not five
    result = run_idefics("transcribe", *paths, "--out", tmp_path / "out.jsonl", "--model", tiny_model,
                         "--quant", "none", "--pages", "1-3", "--max-new-tokens", "2", "--no-split", "-q", timeout=600)
    took = time.monotonic() - start
    stderr = result.stderr.decode()
    assert result.returncode == 3 and "Traceback" not in stderr, stderr[-2000:]
    assert all(line.startswith(("error [", "warning: ")) for line in stderr.splitlines()), stderr
    records: dict[str, list[dict]] = {}
    for record in map(json.loads, open(tmp_path / "out.jsonl")):
        records.setdefault(os.path.basename(record["path"]), []).append(record)
    assert sorted(records) == names, set(names) - set(records)
    wrong = []
    for name, rows in records.items():
        got = {r["page"]: (r["error"]["code"] if r["error"] else "ok") for r in rows}
        if name in PAGE_ERRORS:
            expected = PAGE_ERRORS[name]
        else:
            code = ERRORS.get(name, "ok")
            expected = {0: code} if code != "ok" else {r["page"]: "ok" for r in rows if r["page"] >= 1}
        if got != expected or (name in WARNINGS and WARNINGS[name] not in rows[0]["warnings"]):
            wrong.append((name, got, rows[0]["warnings"]))
    assert not wrong, wrong
    print(f"real-world corpus: {len(names)} files in {took:.0f} s")
