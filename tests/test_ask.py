"""`idefics ask` end to end: fidelity to the model card's code, 4-bit, pages, streaming, JSON and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_image, make_pdf, run_idefics

FAST = ["--max-new-tokens", "6", "--quant", "none"]


def plain_answer(model_dir, image_path, question, split, max_new_tokens):
    """The idefics2-8b model card's snippet, verbatim in spirit, on the same model and image."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=split)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(image_path)], return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(generated[:, inputs["input_ids"].size(1):], skip_special_tokens=True)[0]
    return answer, inputs


@pytest.fixture
def spy_generate(monkeypatch):
    """Record what reaches the model: each `generate` call (the model card's path) and each prefill of the decode
    loop (the CLI's), with the vision tower calls that preceded it (they all still run)."""
    import torch
    from transformers import Idefics2ForConditionalGeneration
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Model

    from idefics_cli.runtime import decode

    calls, vision = [], []
    real, real_prefill = Idefics2ForConditionalGeneration.generate, decode.prefill
    real_features = Idefics2Model.get_image_features

    def recording(self, *args, **kwargs):
        call = {k: v for k, v in kwargs.items() if k in ("input_ids", "pixel_values", "pixel_attention_mask")}
        call["vision"] = vision[:]
        vision.clear()
        calls.append(call)
        try:
            return real(self, *args, **kwargs)
        finally:
            call["vision"] += vision
            vision.clear()

    def prefill(engine, rows):
        calls.append({"input_ids": torch.tensor([row.ids for row in rows]), "vision": vision[:],
                      "features": [row.features for row in rows]})
        vision.clear()
        return real_prefill(engine, rows)

    def features(self, pixel_values, pixel_attention_mask=None, **kwargs):
        vision.append((pixel_values.clone(), pixel_attention_mask))
        return real_features(self, pixel_values, pixel_attention_mask, **kwargs)

    monkeypatch.setattr(Idefics2ForConditionalGeneration, "generate", recording)
    monkeypatch.setattr(decode, "prefill", prefill)
    monkeypatch.setattr(Idefics2Model, "get_image_features", features)
    return calls


def trimmed(pixel_values, mask) -> list:
    """Each image of a padded [rows, images, 3, H, W] batch cut back to its real size (the mask's extent)."""
    out = []
    for values, masks in zip(pixel_values, mask):
        for image, m in zip(values, masks):
            if m.any():
                out.append(image[:, : int(m.any(1).sum()), : int(m.any(0).sum())])
    return out


def vision_images(call) -> list:
    """The images the CLI's chunked vision calls received, unpadded (every call carries no pixel mask)."""
    assert all(mask is None for _, mask in call["vision"])
    return [image for values, _ in call["vision"] for row in values for image in row]


def same_images(got: list, expected: list) -> bool:
    """The same images, each exactly (the CLI encodes them grouped by shape, so order may differ)."""
    left = list(got)
    for image in expected:
        match = next((k for k, g in enumerate(left) if g.shape == image.shape and (g == image).all()), None)
        if match is None:
            return False
        left.pop(match)
    return not left


@pytest.mark.parametrize("split", [True, False])
def test_answer_and_model_inputs_equal_model_card_code(cli, tiny_model, tmp_path, spy_generate, split):
    image_path = tmp_path / "page.png"
    make_image(420, 300, seed=7).save(image_path)
    question = "What is the total amount due?"
    expected, plain = plain_answer(tiny_model, image_path, question, split, 12)
    flag = "--split" if split else "--no-split"
    result = cli("ask", image_path, question, "--json", "--model", tiny_model, "--quant", "none", "--max-new-tokens",
                 "12", flag)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["answer"] == expected
    assert answer["split"] is split and answer["usage"]["image_tokens"] == (320 if split else 64)
    assert len(spy_generate) == 2  # the plain snippet, then the CLI's prefill
    seen = spy_generate[-1]
    assert seen["input_ids"].shape == plain["input_ids"].shape and (seen["input_ids"] == plain["input_ids"]).all()
    # the pixels: the processor's own, each image unpadded, through the vision tower before the prefill
    assert "pixel_values" not in seen and seen["features"][0] is not None
    assert same_images(vision_images(seen), trimmed(plain["pixel_values"], plain["pixel_attention_mask"]))


def test_json_fields_are_real(cli, tiny_model, tmp_path):
    image_path = tmp_path / "a.png"
    make_image(seed=1).save(image_path)
    result = cli("ask", image_path, "Describe it", "--json", "--model", tiny_model, *FAST)
    answer = json.loads(result.stdout)
    assert answer["schema"] == "idefics-cli.answer/1" and answer["question"] == "Describe it"
    assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 6
    assert answer["sources"] == [{"path": str(image_path), "pages": [1]}]
    assert answer["model"] == {"id": tiny_model, "revision": None, "quantization": "none", "dtype": "float32",
                               "device": "cpu", "family": "idefics2", "quantization_reason": "--quant none"}
    assert answer["usage"]["prompt_tokens"] > answer["usage"]["image_tokens"] == 320
    timing = answer["timing"]
    assert set(timing) == {"load_s", "preprocess_s", "first_token_s", "total_s"}
    assert 0 < timing["first_token_s"] < timing["total_s"] and timing["load_s"] > 0 and timing["preprocess_s"] > 0
    assert result.stdout.count("\n") == 1


def test_pdf_pages_reach_the_model_as_two_images(cli, tiny_model, tmp_path, spy_generate):
    pdf = make_pdf(tmp_path / "report.pdf", n_pages=4)
    result = cli("ask", pdf, "--pages", "2-3", "Which year?", "--json", "--model", tiny_model, "--dpi", "72", *FAST)
    answer = json.loads(result.stdout)
    assert answer["usage"]["image_tokens"] == 2 * 320
    assert answer["sources"] == [{"path": pdf, "pages": [2, 3]}]
    # 2 images x (4 crops + original) in the prompt; the tower gets each distinct one once (blank crops are alike)
    images = vision_images(spy_generate[0])
    assert len({(image.shape, image.numpy().tobytes()) for image in images}) == len(images) < 10


def test_several_documents_and_each_page(cli, tiny_model, tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    img = tmp_path / "s.png"
    make_image(seed=2).save(img)
    result = cli("ask", pdf, img, "What?", "--each-page", "--json", "--model", tiny_model, "--dpi", "72", *FAST)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(a["sources"][0]["path"], a["sources"][0]["pages"]) for a in lines] == [(pdf, [1]), (pdf, [2]),
                                                                                  (str(img), [1])]
    assert all(a["usage"]["image_tokens"] == 320 for a in lines)
    text = cli("ask", pdf, "What?", "--each-page", "--model", tiny_model, "--dpi", "72", *FAST)
    assert text.stdout.count("==> ") == 2 and f"==> {pdf} [page 2] <==" in text.stdout


def test_stdin_document(tiny_model, tmp_path):
    path = tmp_path / "receipt.jpg"
    make_image(seed=4).save(path, quality=90)
    result = run_idefics("ask", "-", "What is the merchant's name?", "--json", "--model", tiny_model, *FAST,
                         input=path.read_bytes())
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["sources"] == [{"path": "-", "pages": [1]}] and answer["usage"]["image_tokens"] == 320


_GATED = """
import sys
from idefics_cli.runtime import decode

real, held = decode.Loop.step, []


def gated(self):
    if not held and any(row.text.strip() for row in self.rows):
        held.append(True)
        sys.stderr.write("gate held\\n")
        sys.stdin.buffer.read(1)  # the next token waits until the test has seen text on stdout
    return real(self)


decode.Loop.step = gated
from idefics_cli.cli import app

app(sys.argv[2:], prog_name="idefics")
"""


def test_stream_reaches_stdout_before_generation_ends(tiny_model, tmp_path):
    """Generation is held at a gate once it has produced visible text; the text must reach stdout meanwhile.

    Events, not timing: a CLI that kept the answer until the end would never print while the gate holds.
    """
    import select

    image_path = tmp_path / "p.png"
    make_image(seed=9).save(image_path)
    proc = subprocess.Popen([sys.executable, "-c", _GATED, tiny_model, "ask", str(image_path), "Tell me everything.",
                             "--model", tiny_model, "--quant", "none", "--max-new-tokens", "40"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        streamed = select.select([proc.stdout], [], [], 240)[0]
        first = os.read(proc.stdout.fileno(), 4096) if streamed else b""
        held = proc.poll() is None
        proc.stdin.write(b"x")
        proc.stdin.close()
        rest = proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert b"gate held" in stderr and b"Traceback" not in stderr, stderr[-2000:]
    assert first.strip() and held and proc.returncode == 0
    assert rest.endswith(b"\n")  # the rest of the answer came after the gate opened


def test_prompt_too_long_is_refused_up_front(cli, tiny_model, tmp_path):
    image_path = tmp_path / "p.png"
    make_image().save(image_path)
    result = cli("ask", image_path, "q?", "--model", tiny_model, "--quant", "none", "--max-new-tokens", "32700")
    assert result.exit_code == 2 and "at most 0 pages fit" in result.stderr and result.stdout == ""


def _encrypted_pdf(path):
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=200, height=200).insert_text((20, 50), "secret")
    doc.save(str(path), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    return str(path)


ERROR_CASES = {
    "missing": (lambda d: str(d / "nope.pdf"), [], 4, "not_found"),
    "unsupported": (lambda d: (d / "notes.txt").write_text("hello") and str(d / "notes.txt"), [], 4,
                    "unsupported_format"),
    "corrupt": (lambda d: (d / "bad.pdf").write_bytes(b"%PDF-1.7\n1 0 obj <<>>\ngarbage") and str(d / "bad.pdf"), [],
                4, "corrupt"),
    "truncated_png": (lambda d: (make_image().save(d / "t.png"), (d / "t.png").write_bytes(
        (d / "t.png").read_bytes()[:200]))[0] or str(d / "t.png"), [], 4, "corrupt"),
    "encrypted": (lambda d: _encrypted_pdf(d / "e.pdf"), [], 4, "encrypted"),
    "wrong_password": (lambda d: _encrypted_pdf(d / "e.pdf"), ["--password", "nope"], 4, "wrong_password"),
    "page_out_of_range": (lambda d: make_pdf(d / "r.pdf", 2), ["--pages", "5"], 4, "page_out_of_range"),
    "bad_page_spec": (lambda d: make_pdf(d / "r.pdf", 2), ["--pages", "2-1"], 2, "usage"),
    "model_not_found": (lambda d: make_pdf(d / "r.pdf", 1), ["--model", "/definitely/not/here"], 5, "model_error"),
    "not_cached_offline": (lambda d: make_pdf(d / "r.pdf", 1), ["--model", "someorg/not-cached", "--offline"], 5,
                           "model_error"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_paths_one_line_code_no_traceback(cli, tiny_model, tmp_path, monkeypatch, case):
    make, extra, status, code = ERROR_CASES[case]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    path = make(tmp_path)
    model = [] if "--model" in extra else ["--model", tiny_model]
    result = cli("ask", path, "What is it?", *model, *extra, "--quant", "none", "--max-new-tokens", "2")
    assert result.exit_code == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error [{code}]"), result.stderr
    if status == 4:
        assert os.path.basename(path) in lines[0]
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_error_in_subprocess_has_no_traceback_unless_debug(tmp_path):
    result = run_idefics("ask", tmp_path / "missing.png", "q")
    assert result.returncode == 4 and result.stdout == b""
    assert result.stderr.decode().strip().splitlines() == [
        f"error [not_found]: {tmp_path / 'missing.png'}: no such file (check the path)"]
    debug = run_idefics("ask", tmp_path / "missing.png", "q", env={"IDEFICS_DEBUG": "1"})
    assert debug.returncode == 4 and b"Traceback" in debug.stderr


def test_text_answer_cut_by_max_new_tokens_says_so_on_stderr(cli, tiny_model, tmp_path):
    image = tmp_path / "p.png"
    make_image().save(image)
    cut = cli("ask", image, "What is it?", "--model", tiny_model, "--quant", "none", "--max-new-tokens", "1")
    as_json = json.loads(cli("ask", image, "What is it?", "--model", tiny_model, "--quant", "none",
                             "--max-new-tokens", "1", "--json").stdout)
    assert cut.exit_code == 0 and as_json["finish_reason"] == "length"
    assert cut.stderr.splitlines() == [
        "warning: the answer was cut at --max-new-tokens 1; raise it for the whole answer"]
    assert as_json["warnings"] == []


def test_usage_errors(cli):
    assert cli("ask", "only-a-question").exit_code == 2
    assert cli("ask", "a.pdf", "q", "--quant", "3bit").exit_code == 2


def test_two_documents_and_no_question_is_refused_not_asked(cli, tiny_model, tmp_path, monkeypatch):
    """`idefics ask a.pdf b.png`, the question forgotten: b.png was asked as the question (exit 0); a last argument
    that names a file (one word) is a usage error now, before anything loads."""
    monkeypatch.chdir(tmp_path)
    make_pdf(tmp_path / "a.pdf", 1)
    make_image().save(tmp_path / "b.png")
    res = cli("ask", "a.pdf", "b.png", "--model", tiny_model, "--quant", "none", "--max-new-tokens", "2")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("error [usage]: the question 'b.png' is a file: no question was given"), res.stderr
    res = cli("ask", "b.png", "a.pdf is what?", "--model", tiny_model, "--quant", "none", "--max-new-tokens", "2")
    assert res.exit_code == 0 and res.stdout.strip()  # a question that mentions a file is a question


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["transcribe", "--help"]])
def test_help_imports_no_torch_and_shows_examples(args):
    code = (f"import sys\nfrom idefics_cli.cli import app\ntry:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'pymupdf', 'PIL') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    if args != ["--help"]:
        assert "Examples" in result.stdout


@pytest.mark.parametrize("each_page", [False, True])
def test_every_chosen_page_is_decoded_before_the_model_loads(tiny_model, tmp_path, each_page):
    """A truncated image or a PDF whose page 2 loops in its page tree fails at once, without importing torch."""
    from conftest import run_traced
    from hostile import page_tree_cycle_pdf

    cycle = tmp_path / "cycle.pdf"
    cycle.write_bytes(page_tree_cycle_pdf(good_pages=1))  # page 1 reads, page 2 does not
    truncated = tmp_path / "truncated.png"
    make_image(320, 240).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-300])  # header intact, pixel data cut short
    good = make_pdf(tmp_path / "good.pdf", 2)
    each = ["--each-page"] if each_page else []
    for docs, bad, page in (([good, cycle], cycle, 2), ([truncated, good], truncated, 1)):
        res, imported = run_traced("ask", *docs, "What is it?", "--model", tiny_model, *each, *FAST,
                                   tmp_path=tmp_path)
        stderr = res.stderr.decode()
        assert res.returncode == 4, stderr
        assert stderr.startswith(f"error [corrupt]: {bad}: page {page} could not be decoded"), stderr
        assert len(stderr.strip().splitlines()) == 1 and res.stdout == b""
        assert imported == []  # the model never started loading


def test_pages_are_clipped_to_each_document(cli, tiny_model, tmp_path):
    """The README's `ask report.pdf scan.png --pages 1-3`: pages 1-3 of the report, the image's one page."""
    report = make_pdf(tmp_path / "report.pdf", n_pages=4)
    scan = tmp_path / "scan.png"
    make_image(seed=5).save(scan)
    result = cli("ask", report, scan, "--pages", "1-3", "Which year?", "--json", "--model", tiny_model, "--dpi", "72",
                 *FAST)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["sources"] == [{"path": report, "pages": [1, 2, 3]}, {"path": str(scan), "pages": [1]}]
    result = cli("ask", report, "--pages", "3-9", "Which year?", "--json", "--model", tiny_model, "--dpi", "72",
                 *FAST)
    assert json.loads(result.stdout)["sources"] == [{"path": report, "pages": [3, 4]}]
    # a document that has none of the chosen pages is the one error
    result = cli("ask", report, scan, "--pages", "2-3", "Which year?", "--model", tiny_model, *FAST)
    assert result.exit_code == 4 and result.stderr.startswith(f"error [page_out_of_range]: {scan}: none of the")
