import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib

import pymupdf
import pytest
from PIL import Image

from idefics_cli import documents
from idefics_cli.documents import DEFAULT_LONGEST_SIDE, MAX_PIXELS, Document, open_document, sniff
from idefics_cli.errors import IdeficsError, UsageError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pdf_bytes(*sizes, rotation=0, **save_kwargs):
    doc = pymupdf.open()
    for width, height in sizes or [(595, 842)]:
        page = doc.new_page(width=width, height=height)
        page.insert_text((20, 40), "Hello", fontname="helv", fontsize=12)
        if rotation:
            page.set_rotation(rotation)
    return doc.tobytes(**save_kwargs)


def image_bytes(im, fmt, **kwargs):
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def error_of(fn, *args, **kwargs):
    with pytest.raises(IdeficsError) as exc:
        fn(*args, **kwargs)
    return exc.value


def close(a, b, tol=3):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def png_header(width, height, bit_depth=8, color_type=2):
    """A small PNG whose header (valid CRCs) claims any size: a decompression bomb's header."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)  # the start of an endless stream of zeros
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zero_page_pdf():
    from hostile import _pdf_from_objects

    return _pdf_from_objects([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])


# --- sniffing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"%PDF-1.7\n", "pdf"),
        (b"\x00junk\n" * 20 + b"%PDF-1.4\n", "pdf"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00", "bmp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"MM\x00*\x00\x08", "tiff"),
        (b"BMW annual report, plain text", None),
        (b"hello world", None),
        (b"", None),
        (b"x" * 1100 + b"%PDF-1.4", None),
    ],
)
def test_sniff(head, kind):
    assert sniff(head) == kind


def test_sniff_agrees_with_pillow_output():
    im = Image.new("RGB", (4, 4))
    for fmt, kind in [
        ("PNG", "png"),
        ("JPEG", "jpeg"),
        ("WEBP", "webp"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
    ]:
        assert sniff(image_bytes(im, fmt)) == kind
    assert sniff(pdf_bytes()) == "pdf"


def test_import_is_cheap():
    code = "import sys, idefics_cli.documents; assert not {'pymupdf', 'PIL', 'fitz'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_each_image_format_is_one_rgb_page_of_the_same_size(tmp_path, fmt):
    path = write(tmp_path, f"a.{fmt.lower()}", image_bytes(Image.new("RGB", (37, 23), BLUE), fmt))
    with open_document(path) as doc:
        assert isinstance(doc, Document) and doc.kind == documents.sniff(open(path, "rb").read())
        assert doc.page_count == 1 and doc.path == path
        im = doc.render(1)
    assert im.mode == "RGB" and im.size == (37, 23)
    assert close(im.getpixel((10, 10)), BLUE, 8)


def test_animated_gif_is_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with open_document(write(tmp_path, "a.gif", data)) as doc:
        assert doc.page_count == 1
        assert doc.render(1).getpixel((0, 0)) == RED


def test_multi_frame_tiff_is_one_page_per_frame(tmp_path):
    frames = [Image.new("RGB", (8 + i, 8), c) for i, c in enumerate((RED, GREEN, BLUE))]
    data = image_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with open_document(write(tmp_path, "scan.tif", data)) as doc:
        assert doc.page_count == 3
        renders = [doc.render(p) for p in (3, 1, 2)]
    assert [(im.size[0], im.getpixel((0, 0))) for im in renders] == [(10, BLUE), (8, RED), (9, GREEN)]


def test_magic_bytes_beat_the_extension(tmp_path):
    path = write(tmp_path, "really_a_png.pdf", image_bytes(Image.new("RGB", (5, 5), RED), "PNG"))
    with open_document(path) as doc:
        assert doc.kind == "png" and doc.render(1).getpixel((2, 2)) == RED
    with open_document(write(tmp_path, "really_a_pdf.png", pdf_bytes())) as doc:
        assert doc.kind == "pdf"


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), WHITE)  # stored landscape, with a red mark at the stored top-left
    im.paste(RED, (0, 0, 6, 6))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = image_bytes(im, "JPEG", quality=95, exif=exif.tobytes())
    with open_document(write(tmp_path, "photo.jpg", data)) as doc:
        out = doc.render(1)
    assert out.size == (20, 40)
    assert close(out.getpixel((17, 2)), RED, 40)  # the stored top-left corner is now the top-right
    assert close(out.getpixel((2, 2)), WHITE, 40)


def test_rgba_is_composited_onto_white(tmp_path):
    im = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 128))
    im.putpixel((2, 0), (255, 0, 0, 255))
    with open_document(write(tmp_path, "a.png", image_bytes(im, "PNG"))) as doc:
        out = doc.render(1)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert close(out.getpixel((1, 0)), (127, 127, 127), 2)
    assert out.getpixel((2, 0)) == RED


def test_la_and_palette_transparency_become_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    cases = [("la.png", la, {}), ("p.png", pal, {"transparency": 0}), ("p.gif", pal, {"transparency": 0})]
    for name, im, kwargs in cases:
        with open_document(write(tmp_path, name, image_bytes(im, name.split(".")[1].upper(), **kwargs))) as doc:
            out = doc.render(1)
        assert out.mode == "RGB"
        assert out.getpixel((0, 0)) == WHITE, name
        assert out.getpixel((1, 0)) != WHITE, name


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    data = image_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    with open_document(write(tmp_path, "cmyk.jpg", data)) as doc:
        out = doc.render(1)
    assert out.mode == "RGB" and close(out.getpixel((4, 4)), RED, 10)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    im = Image.new("I;16", (3, 1), 0)
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 32896)
    with open_document(write(tmp_path, "deep.png", image_bytes(im, "PNG"))) as doc:
        out = doc.render(1)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [WHITE, (128, 128, 128), (0, 0, 0)]


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    for mode in ("L", "1"):
        with open_document(write(tmp_path, f"{mode}.png", image_bytes(Image.new(mode, (4, 4), 255), "PNG"))) as doc:
            assert doc.render(1).getpixel((0, 0)) == WHITE


def test_images_are_not_resized(tmp_path):
    with open_document(write(tmp_path, "big.png", image_bytes(Image.new("RGB", (3000, 50)), "PNG"))) as doc:
        assert doc.render(1).size == (3000, 50)


def test_decompression_bomb_header_is_refused(tmp_path):
    err = error_of(open_document, write(tmp_path, "bomb.png", png_header(50000, 50000)))
    assert err.code == "image_too_large" and err.path.endswith("bomb.png")


def test_own_pixel_limit_holds_even_without_pillows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # in this process: the worker's side, run here
    err = error_of(documents.open_here, "bomb.png", "png", png_header(20000, 10000), None, None, DEFAULT_LONGEST_SIDE)
    assert err.code == "image_too_large" and "20000x10000" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF"])
def test_truncated_image_is_corrupt(tmp_path, fmt):
    im = Image.effect_noise((64, 64), 60).convert("RGB")
    data = image_bytes(im, fmt)
    path = write(tmp_path, "cut", data[: len(data) // 2])
    with pytest.raises(IdeficsError) as exc:
        with open_document(path) as doc:
            doc.render(1)
    assert exc.value.code == "corrupt" and exc.value.path == path


# --- PDFs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "rotation", "expected"),
    [
        ((595, 842), 0, (1386, 1960)),
        ((842, 595), 0, (1960, 1386)),
        ((595, 842), 90, (1960, 1386)),
        ((612, 792), 0, (1515, 1960)),
        ((100, 100), 0, (1960, 1960)),
    ],
)
def test_pdf_default_render_longest_side(tmp_path, size, rotation, expected):
    with open_document(write(tmp_path, "a.pdf", pdf_bytes(size, rotation=rotation))) as doc:
        im = doc.render(1)
    assert im.mode == "RGB" and max(im.size) == DEFAULT_LONGEST_SIDE
    assert im.size == expected


def test_pdf_dpi_72_is_the_page_size_in_points(tmp_path):
    with open_document(write(tmp_path, "a.pdf", pdf_bytes((595, 842), (300, 200))), dpi=72) as doc:
        assert doc.page_count == 2
        assert doc.render(1).size == (595, 842)
        assert doc.render(2).size == (300, 200)


def test_pdf_longest_side_option(tmp_path):
    with open_document(write(tmp_path, "a.pdf", pdf_bytes()), longest_side=980) as doc:
        assert doc.render(1).size == (693, 980)


def test_huge_page_stays_within_the_pixel_budget(tmp_path):
    a0 = (2384, 3370)
    for kwargs in ({"dpi": 600}, {"longest_side": 100_000}):
        with open_document(write(tmp_path, "a0.pdf", pdf_bytes(a0)), **kwargs) as doc:
            w, h = doc.render(1).size
        assert w * h <= MAX_PIXELS
        assert w * h > 0.98 * MAX_PIXELS
        assert abs(w / h - a0[0] / a0[1]) < 0.01


def test_pdf_renders_text(tmp_path):
    with open_document(write(tmp_path, "a.pdf", pdf_bytes()), dpi=72) as doc:
        im = doc.render(1)
    assert im.getextrema() == ((0, 255), (0, 255), (0, 255))  # black text on a white page


def test_encrypted_pdf(tmp_path):
    data = pdf_bytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    path = write(tmp_path, "secret.pdf", data)
    err = error_of(open_document, path)
    assert (err.code, err.path) == ("encrypted", path) and "--password" in err.hint
    assert error_of(open_document, path, password="nope").code == "wrong_password"
    assert error_of(open_document, path, password="").code == "wrong_password"
    for password in ("user", "owner"):
        with open_document(path, password=password) as doc:
            assert doc.page_count == 1 and doc.render(1).size == (1386, 1960)


def test_owner_password_only_opens_without_password(tmp_path):
    data = pdf_bytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", permissions=0)
    with open_document(write(tmp_path, "locked.pdf", data)) as doc:
        assert doc.page_count == 1


def test_zero_page_pdf_is_empty(tmp_path):
    assert pymupdf.open(stream=zero_page_pdf(), filetype="pdf").page_count == 0
    err = error_of(open_document, write(tmp_path, "empty.pdf", zero_page_pdf()))
    assert err.code == "empty_document"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_pdf_is_repaired_or_corrupt(tmp_path, cut, capsys):
    data = pdf_bytes((595, 842), (595, 842))
    path = write(tmp_path, "cut.pdf", data[: int(len(data) * cut)])
    try:
        with open_document(path) as doc:
            for page in range(1, doc.page_count + 1):
                try:
                    assert doc.render(page).mode == "RGB"
                except IdeficsError as e:
                    assert e.code == "corrupt"
    except IdeficsError as e:
        assert e.code == "corrupt" and e.path == path
    assert capsys.readouterr().out == ""  # MuPDF's complaints never reach stdout


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"%PDF-1.4\n" + bytes(range(256)) * 4, "corrupt"),
        (b"%PDF-", "corrupt"),
        (bytes(range(256)) * 4, "unsupported_format"),
        (b"just some text\n", "unsupported_format"),
    ],
)
def test_garbage(tmp_path, data, code):
    err = error_of(open_document, write(tmp_path, "junk.pdf", data))
    assert err.code == code
    if code == "unsupported_format":
        assert "PDF" in err.message and "PNG" in err.message


def test_broken_page_content_is_corrupt_or_renders(tmp_path):
    raw = (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj "
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 100 100]/Contents 4 0 R>>endobj "
        b"4 0 obj<</Length 9999/Filter/FlateDecode>>stream\nnot deflate\nendstream endobj trailer<</Root 1 0 R>>"
    )
    with open_document(write(tmp_path, "bad.pdf", raw), dpi=72) as d:
        try:
            assert d.render(1).size == (100, 100)
        except IdeficsError as e:
            assert e.code == "corrupt"


# --- files, stdin, hashing, page numbers ------------------------------------------------------------------


def test_empty_file(tmp_path):
    err = error_of(open_document, write(tmp_path, "empty.pdf", b""))
    assert err.code == "empty_document"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pdf")
    err = error_of(open_document, path)
    assert (err.code, err.path) == ("not_found", path) and err.hint
    assert error_of(open_document, str(tmp_path / "nope.pdf" / "x")).code == "not_found"


def test_directory(tmp_path):
    err = error_of(open_document, str(tmp_path))
    assert err.code == "unsupported_format" and "directory" in err.message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path):
    path = write(tmp_path, "locked.pdf", pdf_bytes())
    os.chmod(path, 0)
    assert error_of(open_document, path).code == "permission_denied"


def test_permission_denied_even_as_root(tmp_path, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(documents, "open", deny, raising=False)
    err = error_of(open_document, write(tmp_path, "locked.pdf", pdf_bytes()))
    assert err.code == "permission_denied" and err.hint


def test_stdin_via_data_and_via_sys_stdin(monkeypatch):
    data = pdf_bytes()
    with open_document("-", data=data) as doc:
        assert (doc.path, doc.kind, doc.page_count) == ("-", "pdf", 1)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(image_bytes(Image.new("RGB", (2, 2)), "PNG"))))
    with open_document("-") as doc:
        assert (doc.path, doc.kind) == ("-", "png")


def test_stdin_terminal_is_a_usage_error(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    with pytest.raises(UsageError):
        open_document("-")


def test_sha256_is_of_the_source_bytes(tmp_path):
    for name, data in [("a.pdf", pdf_bytes()), ("a.png", image_bytes(Image.new("RGB", (3, 3)), "PNG"))]:
        with open_document(write(tmp_path, name, data)) as doc:
            assert doc.sha256 == hashlib.sha256(data).hexdigest()


def test_render_out_of_range(tmp_path):
    path = write(tmp_path, "a.pdf", pdf_bytes((200, 200), (200, 200)))
    with open_document(path) as doc:
        for page in (0, 3, -1):
            err = error_of(doc.render, page)
            assert (err.code, err.path) == ("page_out_of_range", path)
        assert "the document has 2 pages" in error_of(doc.render, 3).message


def test_bad_render_options_are_usage_errors():
    with pytest.raises(UsageError):
        open_document("-", data=pdf_bytes(), dpi=0)
    with pytest.raises(UsageError):
        open_document("-", data=pdf_bytes(), longest_side=-5)


def test_samples_generate_and_open(tmp_path):
    subprocess.run(
        [sys.executable, "samples/make_samples.py", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=os.path.join(os.path.dirname(__file__), ".."),
    )
    counts = {}
    for name in ("invoice.pdf", "report.pdf", "receipt.jpg"):
        assert (tmp_path / name).stat().st_size < 100_000
        with open_document(str(tmp_path / name)) as doc:
            counts[name] = doc.page_count
            first = doc.render(1)
    assert counts == {"invoice.pdf": 1, "report.pdf": 4, "receipt.jpg": 1}
    assert first.size[0] < first.size[1]  # the receipt is upright after EXIF orientation


def test_pdf_with_junk_before_the_header_opens():
    with open_document("-", data=b"junk\n" * 50 + pdf_bytes()) as doc:
        assert doc.kind == "pdf" and doc.render(1).size == (1386, 1960)


# ---- telling the truth about a page (real-world classes; the files are built by tests/hostile.py) ----------------

def _code(data: bytes, password=None, page=None) -> str:
    try:
        with open_document("f", data=data, password=password) as doc:
            for p in [page] if page else range(1, doc.page_count + 1):
                doc.render(p)
        return "ok"
    except IdeficsError as err:
        return f"{err.code}: {err.message}"


def test_pdf_with_unreachable_page_objects_is_corrupt_and_an_empty_one_is_empty():
    import hostile

    assert _code(hostile._count_zero_pdf()) == (
        "corrupt: the PDF is damaged: its page tree reaches none of its 2 page objects")
    assert _code(hostile._empty_pdf()) == "empty_document: the PDF has no pages"


def test_damaged_encryption_says_what_is_wrong_instead_of_asking_for_a_password():
    import hostile

    for password in (None, "user"):
        assert _code(hostile._damaged_encryption_pdf(), password) == (
            "corrupt: the PDF cannot be decrypted with any password: its encryption dictionary is damaged: /U is 28 "
            "bytes, revision 6 needs 48")
    assert _code(hostile._encrypted_pdf("user").replace(b"/R 6", b"/R 9", 1), "user") == (
        "corrupt: not a readable PDF (unknown crypt revision 9)")


def test_aes256_password_is_normalised_with_saslprep():
    import hostile

    data = hostile._encrypted_pdf("pässwörd pin")  # what a conforming writer keys from "pässwörd\u00a0pin"
    assert _code(data, "pa\u0308sswo\u0308rd\u00a0pin") == "ok"
    assert _code(data, "I\u00adpässwörd pin").startswith("wrong_password")


def test_mupdf_reasons_come_without_their_error_codes():
    import hostile

    assert _code(hostile._cycle_pdf(), page=2) == "corrupt: page 2 could not be decoded (cycle in page tree)"
    assert _code(hostile._cycle_pdf(), page=1) == "ok"


def test_twelve_bit_gray_is_scaled_by_its_real_range():
    import hostile

    with open_document("t.tif", data=hostile._tiff_bits(12)) as doc:
        image = doc.render(1)
    assert image.getextrema() == ((0, 255),) * 3
    assert 120 <= image.getpixel((32, 0))[0] <= 135  # mid-ramp is mid-gray, not black


def test_png_cut_after_its_pixels_reads_pixel_identical():
    import hostile

    cut, pixels = hostile._png_cut_after_pixels()
    with open_document("cut.png", data=cut) as doc:
        assert doc.render(1).tobytes() == pixels


def _warnings(data: bytes, page: int = 1, **kwargs) -> list[str]:
    with open_document("w", data=data, **kwargs) as doc:
        doc.render(page)
        return doc.warnings(page)


def test_pages_read_but_maybe_not_as_expected_carry_warnings():
    import hostile

    assert _warnings(hostile._blank_pdf()) == ["blank_page"]
    assert _warnings(hostile._image_bytes(color=(255, 255, 255), blank=True)) == ["blank_page"]
    assert _warnings(hostile._xfa_pdf()) == ["xfa_form"]
    assert _warnings(hostile._pdf_bytes(2).replace(b"startxref", b"startxreF"), 2) == ["repaired"]
    assert _warnings(hostile._animated_gif()) == ["first_frame_only"]
    assert _warnings(hostile._pdf_bytes(1, size=(14400, 14400)), dpi=300) == ["downscaled"]
    assert _warnings(hostile._pdf_bytes(1, size=(14400, 14400)), dpi=10) == []
    assert _warnings(hostile._pdf_bytes(2)) == [] and _warnings(hostile._image_bytes()) == []


def test_sniff_names_the_new_formats_by_their_bytes():
    from hostile_formats import _zip

    from idefics_cli.documents import damaged_signature

    assert sniff(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20)) == "jp2"
    assert sniff(b"\xffO\xffQ\x00") == "jp2"
    assert sniff(b"P5\n# a comment\n4 4\n255\n") == "pnm" and sniff(b"P1 hello") is None
    assert sniff(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00mif1miaf") == "avif"
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "heif"
    assert sniff(b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isommp41") is None  # an MP4 video
    assert sniff(b"8BPS\x00\x01" + bytes(20)) == "psd"
    assert sniff(b'<?xml version="1.0"?>\n<!-- x --><svg xmlns="http://www.w3.org/2000/svg"/>') == "svg"
    assert sniff(b"<FictionBook xmlns='x'/>") == "fb2" and sniff(b"<html><body/></html>") is None
    assert sniff(bytes(60) + b"BOOKMOBI") == "mobi"
    cbz = _zip([("001.png", b"png"), ("002.png", b"png")])
    assert [sniff(kind(cbz)) for kind in (bytes, bytearray, memoryview)] == ["cbz"] * 3  # any bytes-like
    assert damaged_signature(b"\x89PNG\n\x1a\n" + bytes(30), "scan.png") == "png"
    assert damaged_signature(b"\x89PNG\n\x1a\n" + bytes(30), "scan.bin") is None  # the name says nothing
    assert damaged_signature(b"hello, I am text", "text.png") is None


def test_decoder_chatter_on_fd2_is_dropped_in_worker_threads_and_the_tools_lines_get_out(tmp_path):
    """libtiff writes straight to fd 2 while threads decode at once and the tool writes its own lines: only those
    reach the process's stderr (decoders run in worker processes); IDEFICS_DEBUG=1 lets the chatter out."""
    from hostile import _libtiff_error_tiff

    path = write(tmp_path, "bad.tif", _libtiff_error_tiff())
    code = ("import sys, threading\n"
            "from idefics_cli.documents import open_document\n"
            "def decode():\n"
            "    try:\n"
            f"        open_document({path!r}).render(1)\n"
            "    except Exception as e:\n"
            "        sys.stderr.write(e.one_line() + '\\n')\n"
            "threads = [threading.Thread(target=decode) for _ in range(4)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "print('error [x]: after', file=sys.stderr)\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "IDEFICS_DEBUG"})
    lines = quiet.stderr.decode().splitlines()
    own = f"error [corrupt]: {path}: page 1 could not be decoded (OSError: decoder error -2)"
    assert quiet.returncode == 0 and lines == [own] * 4 + ["error [x]: after"], lines
    noisy = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                           env={**os.environ, "IDEFICS_DEBUG": "1"})
    # libtiff writes "module: ", the message and ".\n" separately: four workers' pieces may interleave
    assert noisy.stderr.decode().count("Not enough data for scanline") >= 4, noisy.stderr.decode()


def test_mupdf_documents_open_and_render_at_once_from_several_threads(tmp_path):
    """The server and transcribe's prefetch thread open documents at the same time: each call takes its own worker
    process, and the pixels are those one thread alone gets; idle workers are reused, not one spawned per file."""
    from concurrent.futures import ThreadPoolExecutor

    from idefics_cli.documents import worker

    paths = [write(tmp_path, f"{i}.pdf", pdf_bytes(*[(200 + 40 * i, 300)] * (i + 1))) for i in range(6)]

    def pixels(path):
        with open_document(path, dpi=36) as doc:
            return [hashlib.sha256(doc.render(p).tobytes()).hexdigest() for p in range(1, doc.page_count + 1)]

    alone = [pixels(p) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(pixels, paths)) == alone
    assert len(worker._alive) <= worker.IDLE  # a worker is held only during a call; extras are killed


def test_an_idle_worker_that_died_is_reaped_not_kept(tmp_path):
    """A worker that dies while idle (killed, out of memory) is replaced, and its connection closed."""
    from idefics_cli.documents import worker

    path = write(tmp_path, "a.pdf", pdf_bytes((200, 300)))
    with open_document(path, dpi=36) as doc:
        doc.render(1)
    idle = list(worker._idle)
    assert idle
    for one in idle:
        one.proc.kill()
        one.proc.wait()
    with open_document(path, dpi=36) as doc:
        assert doc.render(1).size
    assert all(one.conn.closed and one not in worker._alive for one in idle)
    assert all(one.proc.poll() is None for one in worker._alive)


def test_mupdf_workers_are_quiet_and_die_with_the_process(tmp_path):
    """Nothing a worker prints reaches stderr; no worker outlives the run."""
    path = write(tmp_path, "repaired.pdf", pdf_bytes((200, 200)).replace(b"startxref", b"startxreF"))
    code = ("import sys\nfrom idefics_cli.documents import open_document, worker\n"
            f"doc = open_document({path!r})\nassert doc.doc_warnings == ['repaired']\ndoc.render(1)\n"
            "print(*[w.proc.pid for w in worker._alive])\n")
    env = {k: v for k, v in os.environ.items() if k != "IDEFICS_DEBUG"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert run.returncode == 0 and run.stderr == b"", run.stderr
    pids = [int(pid) for pid in run.stdout.split()]
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_readable_zip_named_as_a_container_is_unsupported_not_a_damaged_signature(tmp_path):
    """A well-formed ZIP that is not an EPUB, CBZ or XPS is `unsupported_format` whatever its name says (the format
    is decided by the bytes); only a ZIP whose directory cannot be read is `corrupt`, and is not called a flipped
    bit."""
    from hostile_formats import _zip

    word = _zip([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w:document/>")])
    for name in ("report.epub", "report.cbz", "report.xps", "report.oxps"):
        with pytest.raises(IdeficsError) as err:
            open_document(write(tmp_path, name, word))
        assert err.value.code == "unsupported_format" and "ZIP" in err.value.message, err.value.message
    with pytest.raises(IdeficsError) as err:
        open_document(write(tmp_path, "cut.epub", word[:len(word) // 2]))
    assert err.value.code == "corrupt" and "flipped" not in err.value.message, err.value.message


def test_a_cbz_whose_pages_mupdf_skips_is_unsupported_not_empty_or_short(tmp_path):
    """MuPDF's CBZ reader skips WebP and AVIF entries: a comic of them is `unsupported_format` naming one (not an
    `empty_document`), and one mixing them with PNGs is refused rather than read with pages silently missing."""
    from hostile_formats import _pil_bytes, _striped, _zip

    png, webp = _pil_bytes(_striped(), "PNG"), _pil_bytes(_striped(), "WEBP")
    for name, entries, skipped in [("webp.cbz", [("001.webp", webp), ("002.webp", webp)], "001.webp"),
                                   ("mixed.cbz", [("001.png", png), ("002.webp", webp), ("003.png", png)], "002.webp")]:
        with pytest.raises(IdeficsError) as err:
            open_document(write(tmp_path, name, _zip(entries)))
        assert err.value.code == "unsupported_format" and skipped in err.value.message, err.value.message
    with open_document(write(tmp_path, "png.cbz", _zip([("001.png", png), ("ComicInfo.xml", b"<x/>")]))) as doc:
        assert doc.page_count == 1


def test_an_epub_chapter_mupdf_cannot_find_is_a_corrupt_page_not_its_error_text(tmp_path):
    """MuPDF lays out a chapter missing from the EPUB, or encrypted by DRM, as a page reading 'ERROR: cannot find
    chapter ...': that page is `corrupt` (its text would be transcribed as the book's), the others are read."""
    from hostile_formats import _epub_entries, _zip

    entries = dict(_epub_entries())
    entries["content.opf"] = entries["content.opf"].replace(
        b'media-type="application/xhtml+xml"/>', b'media-type="application/xhtml+xml"/><item id="c2" href="c2.xhtml" '
        b'media-type="application/xhtml+xml"/>').replace(b'<itemref idref="c1"/>', b'<itemref idref="c1"/>'
                                                         b'<itemref idref="c2"/>')
    with open_document(write(tmp_path, "book.epub", _zip(list(entries.items()), stored_first=True))) as doc:
        assert doc.page_count == 2
        doc.render(1)
        with pytest.raises(IdeficsError) as err:
            doc.render(2)
    assert err.value.code == "corrupt" and "c2.xhtml" in err.value.message, err.value.message


def test_a_cbz_zipped_on_a_mac_has_its_pages_only_not_its_appledouble_files(tmp_path):
    """`__MACOSX/._001.png` (AppleDouble metadata a Mac adds when zipping) and dot-files are not pages: MuPDF would
    count each as one more page, failing to decode it."""
    from hostile_formats import _pil_bytes, _striped, _zip

    png = _pil_bytes(_striped(size=(60, 80)), "PNG")
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)
    data = _zip([("001.png", png), ("002.png", png), ("__MACOSX/._001.png", apple), ("__MACOSX/._002.png", apple),
                 (".cover.png", apple)])
    with open_document(write(tmp_path, "mac.cbz", data)) as doc:
        assert doc.page_count == 2 and doc.sha256 == hashlib.sha256(data).hexdigest()
        assert [doc.render(p).size for p in (1, 2)] == [(1470, 1960)] * 2


def test_a_cbz_page_whose_image_mupdf_cannot_decode_is_corrupt_not_blank(tmp_path):
    """MuPDF draws a damaged page image as a blank page; it is `corrupt`, as the image alone is, not `blank_page`."""
    from hostile_formats import _pil_bytes, _striped, _zeroed_pixels, _zip

    png = _pil_bytes(_striped(size=(60, 80)), "PNG")
    with open_document(write(tmp_path, "damaged.cbz", _zip([("001.png", png), ("002.png", _zeroed_pixels(png))]))) \
            as doc:
        assert doc.render(1).size and "blank_page" not in doc.warnings(1)
        with pytest.raises(IdeficsError) as err:
            doc.render(2)
        assert err.value.code == "corrupt" and "page 2's image could not be decoded" in err.value.message


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_an_svg_saved_as_utf16_is_an_svg(tmp_path, encoding):
    svg = ('<?xml version="1.0" encoding="UTF-16"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="80">'
           '<rect width="50" height="40" fill="red"/></svg>')
    data = (b"\xfe\xff" if encoding == "utf-16-be" else b"") + svg.encode(encoding)
    assert sniff(data) == "svg"
    with open_document(write(tmp_path, "drawing.svg", data)) as doc:
        assert doc.kind == "svg" and doc.page_count == 1 and "blank_page" not in (doc.render(1) and doc.warnings(1))


def test_a_comic_zipped_on_windows_with_its_thumbnail_cache_is_a_cbz():
    """Explorer's `Thumbs.db` and `desktop.ini` in a folder of scans zipped on Windows do not make it 'not a CBZ'."""
    from hostile_formats import _pil_bytes, _striped, _zip

    png = _pil_bytes(_striped(), "PNG")
    assert sniff(_zip([("001.png", png), ("Thumbs.db", bytes(64)), ("scans/desktop.ini", b"[x]")])) == "cbz"
    assert sniff(_zip([("001.png", png), ("setup.exe", bytes(64))])) is None


ILLUSTRATOR_SVG = (b'<?xml version="1.0" encoding="utf-8"?>\n<!-- Generator: Adobe Illustrator 16.0.0, SVG Export '
                   b'Plug-In . SVG Version: 6.00 Build 0)  -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
                   b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [\n\t<!ENTITY ns_extend '
                   b'"http://ns.adobe.com/Extensibility/1.0/">\n]>\n<svg version="1.1" '
                   b'xmlns="http://www.w3.org/2000/svg" width="100" height="50"><text x="5" y="30">Hi</text></svg>')


def test_an_svg_with_a_doctype_internal_subset_or_a_long_prolog_is_an_svg(tmp_path):
    """Adobe Illustrator's SVGs declare entities inside their DOCTYPE (`[ <!ENTITY ...> ]`), and a licence comment
    can push `<svg` past the first KiB: both are SVGs, read as such (also when a folder is walked)."""
    from idefics_cli.documents import sniff_file

    long_prolog = ILLUSTRATOR_SVG.replace(b"-->", b"licence " * 300 + b"-->", 1)
    for name, data in [("ai.svg", ILLUSTRATOR_SVG), ("licence.svg", long_prolog)]:
        assert sniff(data) == "svg" and sniff_file(write(tmp_path, name.replace(".svg", ""), data)) == "svg", name
        with open_document(write(tmp_path, name, data)) as doc:
            assert doc.kind == "svg" and doc.page_count == 1 and doc.render(1).size == (1960, 980)
