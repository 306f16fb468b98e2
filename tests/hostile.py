"""A hostile-input corpus, generated at test time (no opaque binaries are committed).

`build(root)` writes every case under root and returns a list of `Case(name, path, code, extra)`: `code`
is the error code `ask` must report ("ok" when the file is valid, a set when either is acceptable because
PyMuPDF repairs some damage), `extra` any flags the case needs.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field

EXTENSIONS = ("pdf", "png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class Case:
    name: str
    path: str
    code: str | frozenset
    extra: list[str] = field(default_factory=list)


def _pdf_bytes(n_pages=2, size=(300, 200), **save) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(n_pages):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((20, 40), f"Page {i + 1}", fontsize=12)
    return doc.tobytes(**save)


def _image_bytes(mode="RGB", size=(64, 48), fmt="PNG", color=None, **save) -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color if color is not None else 128)
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

    frames = [Image.new("P", (40, 30), i * 60) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _multi_tiff(n=3) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (50, 40), (i * 70, 20, 20)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette_transparent_png() -> bytes:
    from PIL import Image

    img = Image.new("P", (40, 30), 1)
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
    out, offsets = b"%PDF-1.7\n", []
    for number, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


def build(root: str) -> list[Case]:
    os.makedirs(root, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, code, filename: str | None = None, extra=None) -> str:
        path = os.path.join(root, filename or name)
        with open(path, "wb") as f:
            f.write(data)
        cases.append(Case(name, path, code if isinstance(code, (str, frozenset)) else frozenset(code), extra or []))
        return path

    for ext in EXTENSIONS:
        add(f"empty.{ext}", b"", "empty_document")
    pdf = _pdf_bytes(3)
    for frac in (0.1, 0.5, 0.9, 0.99):
        add(f"truncated-{int(frac * 100)}.pdf", pdf[: int(len(pdf) * frac)], {"ok", "corrupt", "empty_document"})
    broken_xref = pdf.replace(b"xref", b"xreF").replace(b"startxref", b"startxreF")
    add("broken-xref.pdf", broken_xref, {"ok", "corrupt"})
    encrypted = _pdf_bytes(1, encryption=4, user_pw="user", owner_pw="owner")  # 4 = AES-256
    add("encrypted.pdf", encrypted, "encrypted")
    add("encrypted-wrong.pdf", encrypted, "wrong_password", extra=["--password", "nope"])
    add("encrypted-right.pdf", encrypted, "ok", extra=["--password", "user"])
    add("zero-pages.pdf", b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
        b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", {"empty_document", "corrupt"})
    add("a0-page.pdf", _pdf_bytes(1, size=(2384, 3370)), "ok")
    add("huge-page.pdf", _pdf_bytes(1, size=(14400, 14400)), "ok", extra=["--dpi", "300"])
    add("one-pixel.png", _image_bytes(size=(1, 1)), "ok")
    add("bomb.png", _png_header(50000, 50000), "image_too_large")
    add("cmyk.jpg", _image_bytes("CMYK", fmt="JPEG", color=(0, 128, 255, 0)), "ok")
    add("sixteen-bit.png", _image_bytes("I;16", color=40000), "ok")
    add("palette-transparent.png", _palette_transparent_png(), "ok")
    add("animated.gif", _animated_gif(), "ok")
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
    add("page-tree-cycle.pdf", page_tree_cycle_pdf(), "corrupt")
    add("many-pages.pdf", _many_pages_pdf(10_000), "ok", extra=["--pages=-1"])
    add("name with spaces.png", _image_bytes(), "ok")
    add("newline", _image_bytes(), "ok", filename="new\nline.png")
    add("non-utf8", _image_bytes(), "ok", filename=os.fsdecode(b"caf\xe9-\xff.png"))
    add("non-ascii", _image_bytes(), "ok", filename="é文件.png")
    add("dotdot", _image_bytes(), "ok", filename="evil..%2F..png")
    folder = os.path.join(root, "x.pdf")
    os.makedirs(folder, exist_ok=True)
    cases.append(Case("folder-named-pdf", folder, "unsupported_format"))
    loop_a, loop_b = os.path.join(root, "loop-a.pdf"), os.path.join(root, "loop-b.pdf")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    cases.append(Case("symlink-loop", loop_a, "not_found"))
    cases.append(Case("missing", os.path.join(root, "missing.pdf"), "not_found"))
    return cases
