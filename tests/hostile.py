"""A hostile-input corpus, generated at test time (no opaque binaries are committed).

`build(root)` writes every case under root and returns a list of `Case(name, path, code, extra)`: `code`
is the error code `ask` must report ("ok" when the file is valid, a set when either is acceptable because
PyMuPDF repairs some damage), `extra` any flags the case needs, `warnings` the codes its page records must carry,
`check` a test of the rendered first page (pixels that must come out as the file holds them).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field

EXTENSIONS = ("pdf", "png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "jp2", "pgm", "avif", "heic", "psd",
              "epub", "cbz", "xps", "mobi", "fb2", "svg")


@dataclass
class Case:
    name: str
    path: str
    code: str | frozenset
    extra: list[str] = field(default_factory=list)
    warnings: tuple = ()
    check: object = None


def _pdf_bytes(n_pages=2, size=(300, 200), **save) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(n_pages):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((20, 40), f"Page {i + 1}", fontsize=12)
    return doc.tobytes(**save)


def _image_bytes(mode="RGB", size=(64, 48), fmt="PNG", color=None, blank=False, **save) -> bytes:
    """An image of one colour with a black stripe (a flat one with `blank`, which reads as a blank page)."""
    from PIL import Image

    img = Image.new(mode, size, color if color is not None else 128)
    if not blank:
        img.paste(0, (0, 0, max(size[0] // 2, 1), max(size[1] // 4, 1)))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND",
                                                                                                            b"")


def _javascript_pdf() -> bytes:
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=300, height=200)
    page.insert_text((20, 40), "Has JavaScript and an attachment", fontsize=10)
    doc.embfile_add("payload.sh", b"#!/bin/sh\ntouch /tmp/idefics-pwned\n", filename="payload.sh")
    xref = doc.pdf_catalog()
    js = doc.get_new_xref()
    doc.update_object(js, "<< /Type /Action /S /JavaScript /JS (app.alert('pwned');) >>")
    doc.xref_set_key(xref, "OpenAction", f"{js} 0 R")
    return doc.tobytes()


def _many_pages_pdf(n: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for _ in range(n):
        doc.new_page(width=200, height=100)
    doc[-1].insert_text((20, 40), "last page", fontsize=12)
    return doc.tobytes(garbage=1)


def _animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (40, 30), (200, i * 100, 0)) for i in range(3)]
    for frame in frames:
        frame.paste((0, 0, 255), (0, 0, 20, 5))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _multi_tiff(n=3) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (50, 40), (i * 70, 20, 20)) for i in range(n)]
    for frame in frames:
        frame.paste((250, 250, 250), (0, 0, 25, 10))
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette_transparent_png() -> bytes:
    from PIL import Image

    img = Image.new("P", (40, 30), 1)
    img.paste(0, (0, 0, 20, 5))  # opaque red on a transparent ground
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=1)
    return buf.getvalue()


def page_tree_cycle_pdf(good_pages: int = 0) -> bytes:
    """A PDF whose page tree loops back on itself after `good_pages` readable pages (MuPDF: "cycle in page tree")."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (4 + k) for k in range(good_pages))
                                                          + b" 3 0 R", good_pages + 1),
            b"<< /Type /Pages /Parent 2 0 R /Kids [3 0 R] /Count 1 >>"]
    objs += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 150] >>"] * good_pages
    return _pdf_from_objects(objs)


def _pdf_from_objects(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF with a correct xref table from numbered object bodies (1-based), so MuPDF needs no repair."""
    out, offsets = bytearray(b"%PDF-1.7\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R%s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def _empty_pdf() -> bytes:
    return _pdf_from_objects([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"])


def _cycle_pdf() -> bytes:
    """Page 2 of the page tree is the tree's own root: a cycle (seen in fuzzed files)."""
    return _pdf_bytes(3).replace(b"/Kids[4 0 R 8 0 R", b"/Kids[4 0 R 2 0 R")


def _count_zero_pdf() -> bytes:
    """A fuzzed page count: MuPDF trusts /Count 0 and sees no page; the two page objects are all there."""
    data = _pdf_bytes(2)
    assert b"/Count 2" in data
    return data.replace(b"/Count 2", b"/Count 0")


def _xfa_pdf() -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=300, height=200).insert_text((20, 40), "Please wait...", fontsize=12)
    xfa = doc.get_new_xref()
    doc.update_object(xfa, "<<>>")
    doc.update_stream(xfa, b"<xdp:xdp xmlns:xdp='http://ns.adobe.com/xdp/'><template/></xdp:xdp>", new=True)
    doc.xref_set_key(doc.pdf_catalog(), "AcroForm", f"<</Fields[]/XFA {xfa} 0 R>>")
    doc.xref_set_key(doc.pdf_catalog(), "NeedsRendering", "true")
    return doc.tobytes()


def _blank_pdf() -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=300, height=200)
    return doc.tobytes()


def _encrypted_pdf(password: str) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page(width=300, height=200).insert_text((20, 40), "Secret page", fontsize=12)
    return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner")


def _damaged_encryption_pdf() -> bytes:
    """/U cut from 48 to 28 bytes (as in a damaged real file): MuPDF asks for a password that nothing satisfies."""
    data = _encrypted_pdf("user")
    start = data.index(b"/U<") + 3
    return data[:start] + data[start + 40:]


def slow_render_pdf(depth: int = 7) -> bytes:
    """One page whose form XObject draws the next ten times, `depth` deep: 10^(depth-1) fills, minutes in MuPDF's C."""
    draws = b" ".join([b"q 0.9 0 0 0.9 2 2 cm /F Do Q"] * 10)
    forms = [b"<< /Type /XObject /Subtype /Form /BBox [0 0 200 200] /Resources << /XObject << /F %d 0 R >> >> "
             b"/Length %d >>\nstream\n%s\nendstream" % (6 + k, len(draws), draws) for k in range(depth - 1)]
    leaf = b"0 0 1 rg 10 10 m 190 20 l 100 190 l h f"
    return _pdf_from_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R /Resources << /XObject << /F 5 0 R >> "
        b">> >>", b"<< /Length 5 >>\nstream\n/F Do\nendstream", *forms,
        b"<< /Type /XObject /Subtype /Form /BBox [0 0 200 200] /Length %d >>\nstream\n%s\nendstream" % (len(leaf),
                                                                                                       leaf)])


def _png_cut_after_pixels() -> tuple[bytes, bytes]:
    """A PNG whose trailing text chunk is cut off (its pixels are complete), and the original pixels."""
    from PIL import Image

    img = Image.new("RGB", (64, 48), (10, 200, 30))
    for x in range(64):
        img.putpixel((x, x % 48), (x * 4, 0, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()[:-12]  # drop IEND, then append a text chunk that the file's end cuts off
    text = b"Comment\x00" + b"written by a scanner " * 20
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return data + chunk[:60], img.tobytes()


def _tiff_bits(bits: int, width: int = 64, height: int = 16) -> bytes:
    """An uncompressed grayscale TIFF of `bits` bits per sample: a ramp from 0 to the largest value."""
    top = (1 << bits) - 1
    values = [(i * top) // (width - 1) for i in range(width)] * height
    packed, acc, n = bytearray(), 0, 0
    for row in range(height):
        for v in values[row * width:(row + 1) * width]:
            acc, n = (acc << bits) | v, n + bits
            while n >= 8:
                n -= 8
                packed.append((acc >> n) & 0xFF)
        if n:
            packed.append((acc << (8 - n)) & 0xFF)
            acc = n = 0
    tags = [(256, 3, width), (257, 3, height), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 3, height), (279, 4, len(packed))]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags) + b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8 + len(packed)) + bytes(packed) + ifd


def _int32_tiff() -> bytes:
    """A signed 32-bit TIFF holding a 16-bit ramp (0..65535), as scientific tools write 16-bit data."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.int32)).save(buf, "TIFF")
    return buf.getvalue()


def _libtiff_error_tiff() -> bytes:
    """A PackBits TIFF whose strip data is zeroed in the middle: libtiff prints its complaint straight to fd 2."""
    from PIL import Image

    img = Image.linear_gradient("L").resize((200, 150)).convert("RGB")
    img.paste((10, 200, 30), (20, 20, 120, 60))
    buf = io.BytesIO()
    img.save(buf, "TIFF", compression="packbits")
    data = buf.getvalue()
    return data[:len(data) // 2] + bytes(len(data) // 2 - 200) + data[-200:]


def _corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF block is cut short: Pillow warns (a UserWarning) while reading its orientation."""
    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 10, 10))
    img.paste((0, 0, 0), (0, 0, 32, 12))
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01")
    return buf.getvalue()


def _spans_full_range(image) -> bool:
    return all(lo <= 1 and hi >= 254 for lo, hi in image.getextrema())


def build(root: str) -> list[Case]:
    os.makedirs(root, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, code, filename: str | None = None, extra=None, warnings=(), check=None) -> str:
        path = os.path.join(root, filename or name)
        with open(path, "wb") as f:
            f.write(data)
        cases.append(Case(name, path, code if isinstance(code, (str, frozenset)) else frozenset(code), extra or [],
                          tuple(warnings), check))
        return path

    for ext in EXTENSIONS:
        add(f"empty.{ext}", b"", "empty_document")
    pdf = _pdf_bytes(3)
    for frac in (0.1, 0.5, 0.9, 0.99):
        add(f"truncated-{int(frac * 100)}.pdf", pdf[: int(len(pdf) * frac)], {"ok", "corrupt"})
    broken_xref = pdf.replace(b"xref", b"xreF").replace(b"startxref", b"startxreF")
    add("broken-xref.pdf", broken_xref, {"ok", "corrupt"})
    encrypted = _pdf_bytes(1, encryption=4, user_pw="user", owner_pw="owner")  # 4 = AES-256
    add("encrypted.pdf", encrypted, "encrypted")
    add("encrypted-wrong.pdf", encrypted, "wrong_password", extra=["--password", "nope"])
    add("encrypted-right.pdf", encrypted, "ok", extra=["--password", "user"])
    add("zero-pages.pdf", b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
        b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", "empty_document")
    add("a0-page.pdf", _pdf_bytes(1, size=(2384, 3370)), "ok")
    add("huge-page.pdf", _pdf_bytes(1, size=(14400, 14400)), "ok", extra=["--dpi", "300"], warnings=["downscaled"])
    add("one-pixel.png", _image_bytes(size=(1, 1)), "ok")  # padded with white to 2 px: not one flat colour
    add("bomb.png", _png_header(50000, 50000), "image_too_large")
    add("cmyk.jpg", _image_bytes("CMYK", fmt="JPEG", color=(0, 128, 255, 0)), "ok")
    add("sixteen-bit.png", _image_bytes("I;16", color=40000), "ok")
    add("palette-transparent.png", _palette_transparent_png(), "ok")
    add("animated.gif", _animated_gif(), "ok", warnings=["first_frame_only"])
    add("multi-frame.tiff", _multi_tiff(), "ok")
    jpeg = _image_bytes(fmt="JPEG", size=(200, 150))
    add("corrupt.jpg", jpeg[:200] + b"\x00" * 50, "corrupt")
    add("garbage-middle.png", _image_bytes(size=(120, 90))[:60] + os.urandom(200), "corrupt")
    add("random.pdf", bytes(range(256)) * 8, "unsupported_format")
    add("png-named.pdf", _image_bytes(), "ok")
    add("text.png", b"hello, I am text", "unsupported_format")
    add("html.pdf", b"<html><body>not a pdf</body></html>", "unsupported_format")
    add("zip.pdf", b"PK\x03\x04" + b"\x00" * 100, "unsupported_format")
    add("gif-header-only.gif", b"GIF89a\x10\x00\x10\x00", "corrupt")
    add("bmp-truncated.bmp", _image_bytes(fmt="BMP")[:70], "corrupt")
    add("webp.webp", _image_bytes(fmt="WEBP"), "ok")
    add("webp-corrupt.webp", _image_bytes(fmt="WEBP")[:30], "corrupt")
    add("javascript-attachment.pdf", _javascript_pdf(), "ok")
    add("many-pages.pdf", _many_pages_pdf(10_000), "ok", extra=["--pages=-1"])
    # one question over 14 pages: 4,564 prompt tokens, past Mistral's 4,096-token window; a second token decodes
    add("past-the-window.pdf", _pdf_bytes(14), "ok", extra=["--max-new-tokens", "2"])
    add("name with spaces.png", _image_bytes(), "ok")
    add("newline", _image_bytes(), "ok", filename="new\nline.png")
    add("non-utf8", _image_bytes(), "ok", filename=os.fsdecode(b"caf\xe9-\xff.png"))
    add("non-ascii", _image_bytes(), "ok", filename="é文件.png")
    add("non-utf8-long-name", _image_bytes(), "ok", filename=os.fsdecode(b"\xff" * 240 + b".png"))  # 720-byte .md
    add("dotdot", _image_bytes(), "ok", filename="evil..%2F..png")
    folder = os.path.join(root, "x.pdf")
    os.makedirs(folder, exist_ok=True)
    cases.append(Case("folder-named-pdf", folder, "unsupported_format"))
    loop_a, loop_b = os.path.join(root, "loop-a.pdf"), os.path.join(root, "loop-b.pdf")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    cases.append(Case("symlink-loop", loop_a, "not_found"))
    cases.append(Case("missing", os.path.join(root, "missing.pdf"), "not_found"))
    cases.append(Case("name-too-long", os.path.join(root, "x" * 300 + ".pdf"), "not_found"))  # ENAMETOOLONG
    # real-world classes met in other projects' public corpora (pdf.js, qpdf, pypdf, PyMuPDF, Pillow)
    cut, pixels = _png_cut_after_pixels()
    add("cut-last-chunk.png", cut, "ok", check=lambda image: image.tobytes() == pixels)
    add("page-tree-cycle.pdf", _cycle_pdf(), "corrupt")
    add("page-tree-cycle-page1.pdf", _cycle_pdf(), "ok", extra=["--pages", "1"])
    add("count-zero.pdf", _count_zero_pdf(), "corrupt")
    add("really-empty.pdf", _empty_pdf(), "empty_document")
    add("xfa-form.pdf", _xfa_pdf(), "ok", warnings=["xfa_form"])
    add("blank-page.pdf", _blank_pdf(), "ok", warnings=["blank_page"])
    add("blank-image.png", _image_bytes(color=(255, 255, 255), blank=True), "ok", warnings=["blank_page"])
    add("repaired.pdf", _pdf_bytes(2).replace(b"startxref", b"startxreF"), "ok", warnings=["repaired"])
    add("twelve-bit.tif", _tiff_bits(12), "ok", check=_spans_full_range)
    add("int32-sixteen-bit.tif", _int32_tiff(), "ok", check=_spans_full_range)
    add("libtiff-error.tif", _libtiff_error_tiff(), "corrupt")
    add("corrupt-exif.jpg", _corrupt_exif_jpeg(), "ok")
    add("damaged-encryption.pdf", _damaged_encryption_pdf(), "corrupt")
    add("damaged-encryption-pw.pdf", _damaged_encryption_pdf(), "corrupt", extra=["--password", "user"])
    add("unknown-crypt-revision.pdf", _encrypted_pdf("user").replace(b"/R 6", b"/R 9", 1), "corrupt")
    # AES-256 passwords are SASLprep'd by conforming writers: the key is made from "pass word" (NFKC, plain space)
    saslprep_pdf = _encrypted_pdf("pässwörd pin")
    add("saslprep-nbsp.pdf", saslprep_pdf, "ok", extra=["--password", "pa\u0308sswo\u0308rd\u00a0pin"])
    add("saslprep-wrong.pdf", saslprep_pdf, "wrong_password", extra=["--password", "passwort\u00a0pin"])
    add("slow-render.pdf", slow_render_pdf(), "corrupt")  # past IDEFICS_DECODE_TIMEOUT: given up, not waited on
    from hostile_formats import build_formats

    build_formats(root, add)
    return cases

