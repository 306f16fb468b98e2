"""crops.py and `idefics crops`: the sheet and the --dir images are exactly the pixels the processor hands the model."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import make_image, make_pdf
from PIL import Image

from idefics_cli.documents import open_document
from idefics_cli.tasks.crops import save_crops, sheet_layout


def expected_images(model_dir: str, image, split: bool = True) -> list[np.ndarray]:
    """The processor's pixel_values for one page, de-normalized and unpadded, computed independently here."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor.do_image_splitting = split
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    ip = processor.image_processor
    mean, std = np.array(ip.image_mean).reshape(3, 1, 1), np.array(ip.image_std).reshape(3, 1, 1)
    out = []
    for pv, mask in zip(inputs["pixel_values"][0].double().numpy(), inputs["pixel_attention_mask"][0].numpy(),
                        strict=True):
        arr = np.clip(np.round((pv * std + mean) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        h, w = int(mask.any(1).sum()), int(mask.any(0).sum())
        assert mask[:h, :w].all() and not mask[h:].any() and not mask[:, w:].any()  # padding is bottom/right
        out.append(arr[:h, :w])
    return out


def test_dir_and_sheet_are_the_processor_pixels(cli, tiny_model, tmp_path):
    src = tmp_path / "page.png"
    make_image(1200, 800, seed=3).save(src)  # crops 600x400, whole 980x653: padding inside pixel_values
    crops_dir, sheet_path = tmp_path / "crops", tmp_path / "out" / "sheet.png"
    result = cli("crops", src, "--model", tiny_model, "--dir", crops_dir, "--out", sheet_path)
    assert result.exit_code == 0, result.stderr
    names = ["crop-1-top-left.png", "crop-2-top-right.png", "crop-3-bottom-left.png", "crop-4-bottom-right.png",
             "crop-5-whole.png"]
    assert result.stdout.splitlines() == [str(crops_dir / n) for n in names] + [str(sheet_path)]

    with open_document(str(src)) as doc:
        expected = expected_images(tiny_model, doc.render(1))
    assert len(expected) == 5
    assert [e.shape[:2] for e in expected] == [(400, 600)] * 4 + [(653, 980)]
    for name, want in zip(names, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(crops_dir / name).convert("RGB")), want), name

    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    corners, size = sheet_layout([(e.shape[1], e.shape[0]) for e in expected])
    assert (sheet.shape[1], sheet.shape[0]) == size
    for (x, y), want in zip(corners, expected, strict=True):
        assert np.array_equal(sheet[y: y + want.shape[0], x: x + want.shape[1]], want)


def test_pdf_page_no_split_and_default_name(cli, tiny_model, tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "report.pdf", n_pages=3)
    monkeypatch.chdir(tmp_path)
    result = cli("crops", pdf, "--page", "2", "--dpi", "60", "--no-split", "--model", tiny_model)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "report-page2-crops.png\n"
    with open_document(pdf, dpi=60) as doc:
        (want,) = expected_images(tiny_model, doc.render(2), split=False)
    sheet = np.asarray(Image.open(tmp_path / "report-page2-crops.png").convert("RGB"))
    ((x, y),), _ = sheet_layout([(want.shape[1], want.shape[0])])
    assert np.array_equal(sheet[y: y + want.shape[0], x: x + want.shape[1]], want)

    result = cli("crops", pdf, "--page", "2", "--dpi", "60", "--no-split", "--model", tiny_model, "--dir", "one")
    assert result.stdout == os.path.join("one", "crop-1-whole.png") + "\n"


def test_the_default_name_of_a_document_with_a_newline_in_its_name_is_one_line(cli, tiny_model, tmp_path, monkeypatch):
    """stdout is one written path a line: a newline (or another unprintable) of the document's name is `_` in the
    sheet's default name."""
    make_image(seed=2).save(tmp_path / "scan\nfront.png")
    monkeypatch.chdir(tmp_path)
    result = cli("crops", "scan\nfront.png", "--no-split", "--model", tiny_model)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "scan_front-page1-crops.png\n" and os.path.exists("scan_front-page1-crops.png")


def test_needs_no_model_weights(cli, tiny_model, tmp_path):
    """Only the processor is loaded: a folder without any weights is enough."""
    proc_only = tmp_path / "processor-only"
    shutil.copytree(tiny_model, proc_only, ignore=shutil.ignore_patterns("*.safetensors"))
    src = tmp_path / "p.png"
    make_image(200, 150).save(src)
    result = cli("crops", src, "--model", proc_only, "--dir", tmp_path / "d")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5


@pytest.mark.parametrize(("args", "code", "status"), [
    (["missing.pdf"], "not_found", 4),
    (["{pdf}", "--page", "7"], "page_out_of_range", 4),
    (["{pdf}", "--model", "/nonexistent/model"], "model_error", 5),
])
def test_errors_are_one_line(cli, tiny_model, tmp_path, args, code, status):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    args = [a.format(pdf=pdf) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_model]
    result = cli("crops", *args, "--out", tmp_path / "s.png")
    assert result.exit_code == status
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and f"[{code}]" in result.stderr


def test_an_unwritable_sheet_or_folder_is_one_output_error(tmp_path):
    """crops.save_crops: a write failure is an output_error naming the path, never a traceback."""
    from idefics_cli.errors import IdeficsError

    images = [make_image(40, 30, seed=k) for k in range(2)]
    (tmp_path / "a-file").write_text("x")
    for folder, sheet in ((str(tmp_path / "a-file" / "crops"), None), (None, str(tmp_path / "a-file" / "s.png"))):
        with pytest.raises(IdeficsError) as err:
            save_crops(images, ["tile-1", "whole"], folder, sheet, "title", ["a", "b"])
        assert err.value.code == "output_error" and "a-file" in err.value.message
    written = save_crops(images, ["tile-1", "whole"], str(tmp_path / "d"), str(tmp_path / "s" / "s.png"), "t",
                         ["a", "b"])
    assert written == [str(tmp_path / "d" / "crop-1-tile-1.png"), str(tmp_path / "d" / "crop-2-whole.png"),
                       str(tmp_path / "s" / "s.png")]
    assert all(os.path.getsize(p) > 0 for p in written)


def test_a_sheet_or_crop_that_is_a_symlink_is_written_through_the_link(tmp_path):
    """`--out` (or a file in `--dir`) that is a symlink was replaced by a regular file; its target gets the PNG."""
    images = [make_image(40, 30, seed=k) for k in range(2)]
    (tmp_path / "real").mkdir()
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "real" / "sheet.png", tmp_path / "s.png")  # dangling: the sheet is made there
    os.symlink(tmp_path / "real" / "whole.png", tmp_path / "d" / "crop-2-whole.png")
    save_crops(images, ["tile-1", "whole"], str(tmp_path / "d"), str(tmp_path / "s.png"), "t", ["a", "b"])
    assert os.path.islink(tmp_path / "s.png") and os.path.islink(tmp_path / "d" / "crop-2-whole.png")
    assert Image.open(tmp_path / "real" / "whole.png").size == (40, 30)
    assert sorted(os.listdir(tmp_path / "real")) == ["sheet.png", "whole.png"]


@pytest.mark.parametrize("args", [["--out", ""], ["--out", "{tmp}/sheets/"], ["--dir", ""]])
def test_an_out_or_dir_without_a_name_is_a_usage_error(cli, tiny_model, tmp_path, monkeypatch, args):
    """`--out DIR/` (or `--out ''`) wrote a hidden `DIR/.png`; `--dir ''` was an output_error with no path."""
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "page.png"
    make_image(60, 40, seed=1).save(img)
    (tmp_path / "sheets").mkdir()
    result = cli("crops", img, "--model", tiny_model, *[a.format(tmp=tmp_path) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error [usage]: "), result.stderr
    assert result.stdout == "" and sorted(p.name for p in tmp_path.rglob("*")) == ["page.png", "sheets"]


def test_a_sheet_onto_the_document_itself_is_refused(cli, tiny_model, tmp_path):
    """`crops scan.png --out scan.png` replaced the scan with the contact sheet."""
    img = tmp_path / "scan.png"
    make_image(60, 40, seed=3).save(img)
    before = img.read_bytes()
    for out in (img, tmp_path / "scan"):  # `.png` is added
        result = cli("crops", img, "--model", tiny_model, "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error [usage]: "), result.stderr
        assert result.stdout == "" and img.read_bytes() == before


def test_a_crop_onto_the_document_or_the_sheet_is_refused_before_any_write(cli, tiny_model, tmp_path):
    """`crops crops/crop-1-whole.png --no-split --dir crops` replaced the document with its own crop (exit 0), and a
    sheet named as a crop replaced that crop: a usage error now, with nothing written."""
    folder = tmp_path / "crops"
    folder.mkdir()
    img = folder / "crop-1-whole.png"
    make_image(60, 40, seed=3).save(img)
    before = img.read_bytes()
    other = tmp_path / "page.png"
    make_image(60, 40, seed=4).save(other)
    for doc, extra in ((img, []), (other, ["--out", str(folder / "crop-1-whole.png")])):
        result = cli("crops", doc, "--model", tiny_model, "--no-split", "--dir", folder, *extra)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error [usage]: "), result.stderr
        assert result.stdout == "" and img.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["crop-1-whole.png"]


def test_a_sheet_that_cannot_be_written_whole_leaves_the_previous_one(tiny_model, tmp_path):
    """The sheet was written in place: a write failing half-way (a full disk, here a file size limit) left a
    truncated PNG where the previous sheet was. It is written beside and renamed; nothing else is left."""
    import resource
    import signal
    import subprocess
    import sys

    img = tmp_path / "scan.png"
    make_image(300, 200, seed=4).save(img)
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"previous sheet" * 1000)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is EFBIG, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run([sys.executable, "-m", "idefics_cli", "crops", str(img), "--out", str(sheet), "--model",
                             tiny_model], capture_output=True, timeout=300, preexec_fn=limited,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4 and len(lines) == 1 and lines[0].startswith("error [output_error]"), lines
    assert sheet.read_bytes() == b"previous sheet" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.png", "sheet.png"]
