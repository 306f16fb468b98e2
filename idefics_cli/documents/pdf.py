"""MuPDF documents through PyMuPDF: PDF, XPS/OXPS, EPUB, MOBI, FB2, CBZ and SVG, paginated as MuPDF does.

Contract: a page's longest side is `longest_side` px, or it is rendered at `dpi`, rotation honored, within
`MAX_PIXELS` (else `downscaled`). No JavaScript runs, no attachment is extracted. 0 pages is `empty_document`
only for an empty page tree, else `corrupt`, as is a damaged encryption dictionary, and the page of an EPUB chapter
MuPDF cannot find. A ZIP container whose entries expand past MAX_ARCHIVE_BYTES, or hold an image over
MAX_IMAGE_PIXELS, is `image_too_large`.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import stringprep
import unicodedata
import warnings
from typing import TYPE_CHECKING

from idefics_cli.documents.pages import IMAGE_NAMES, MAX_IMAGE_PIXELS, MAX_PIXELS, NAMES, Document, why
from idefics_cli.errors import IdeficsError

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_ARCHIVE_BYTES = 1 << 30  # what the entries of an EPUB, CBZ or XPS may expand to, in all
_LOST_CHAPTER = re.compile(r'ERROR: cannot find chapter ("[^"\n]*")')  # the page MuPDF lays out in its place


class PdfDocument(Document):
    """A document MuPDF opens: PDF, and XPS/OXPS, EPUB, MOBI, FB2, CBZ and SVG, paginated by MuPDF."""

    def __init__(self, path: str, data: bytes, password: str | None, dpi: int | None, longest_side: int,
                 kind: str = "pdf"):
        super().__init__(path, kind, data)
        self._dpi, self._longest_side = dpi, longest_side
        name = NAMES[kind]
        if kind in ("epub", "cbz", "xps"):
            self._check_archive(data, name)
        if kind == "cbz":
            data = without_hidden(data)
        import pymupdf

        try:
            self._doc = pymupdf.open(stream=data, filetype=kind)
        except Exception as e:
            raise self._error("corrupt", f"not a readable {name} ({why(e)})") from e
        try:
            if self._doc.needs_pass:
                self._authenticate(password)
            self.page_count = self._doc.page_count
            if kind == "cbz":
                self._check_cbz_pages(data)
            if self.page_count == 0 and kind == "pdf" and not empty_page_tree(self._doc):
                found = page_objects(self._doc)
                raise self._error("corrupt", f"the PDF is damaged: its page tree reaches none of its {found} "
                                  "page objects" if found else "the PDF is damaged and no page could be recovered")
            if self.page_count == 0:
                raise self._error("empty_document", f"the {name} has no pages")
            if kind == "pdf" and self._doc.is_repaired:
                self.doc_warnings.append("repaired")
            catalog = self._doc.pdf_catalog() if kind == "pdf" else 0
            if catalog > 0 and self._doc.xref_get_key(catalog, "AcroForm/XFA")[0] != "null":
                self.doc_warnings.append("xfa_form")
        except BaseException as e:
            self._doc.close()
            if isinstance(e, (IdeficsError, KeyboardInterrupt, MemoryError)):
                raise
            raise self._error("corrupt", f"not a readable {name} ({why(e)})") from e

    def _check_archive(self, data: bytes, name: str) -> None:
        """`image_too_large` for a ZIP container whose entries expand past MAX_ARCHIVE_BYTES (a zip bomb), or (CBZ,
        EPUB) whose first oversized image header declares more than MAX_IMAGE_PIXELS; MuPDF judges damaged ones."""
        import zipfile

        from PIL import Image as PILImage

        bad_zip = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError)
        with contextlib.suppress(*bad_zip), zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            total = sum(info.file_size for info in infos)
            if total > MAX_ARCHIVE_BYTES:
                raise self._error("image_too_large", f"the {name} is too large: its {len(infos)} entries expand to "
                                  f"{total / 2**20:,.0f} MiB, over the limit of {MAX_ARCHIVE_BYTES / 2**20:,.0f} MiB "
                                  "(a zip bomb?)")
            for info in infos if self.kind != "xps" else ():
                if info.file_size < 8 or info.is_dir():
                    continue
                with archive.open(info) as entry:
                    head = entry.read(1 << 16)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        width, height = PILImage.open(io.BytesIO(head)).size
                except PILImage.DecompressionBombError as e:
                    big = f"{info.filename}: {why(e)}"
                except Exception:  # noqa: BLE001 - not an image Pillow knows, or its header is further on
                    continue
                else:
                    if width * height <= MAX_IMAGE_PIXELS:
                        continue
                    big = f"{info.filename} is {width}x{height} pixels"
                raise self._error("image_too_large", f"the {name} holds an image over the limit of "
                                  f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels ({big})", "downscale it first")

    def _check_cbz_pages(self, data: bytes) -> None:
        """`unsupported_format` when MuPDF paginates fewer of a CBZ's images than it holds (it skips WebP and AVIF
        entries), rather than a comic read with pages silently missing or called empty."""
        import zipfile

        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            images = [n for n in archive.namelist() if n.lower().endswith(IMAGE_NAMES)]
        if len(images) > self.page_count:
            skipped = next((n for n in images if n.lower().endswith((".webp", ".avif"))), images[-1])
            raise self._error("unsupported_format", f"MuPDF reads {self.page_count} of the {len(images)} images in "
                              f"this CBZ: it skips WebP and AVIF pages such as {skipped}",
                              "convert them to PNG or JPEG")

    def _authenticate(self, password: str | None) -> None:
        """Open an encrypted PDF; AES-256 passwords are tried as typed, then SASLprep-normalised (PDF 2.0)."""
        if password is not None and any(self._doc.authenticate(p) for p in candidates(password)):
            return
        if damage := encryption_damage(self._doc):
            raise self._error("corrupt", f"the PDF cannot be decrypted with any password: {damage}")
        if password is None:
            raise self._error("encrypted", "the PDF is encrypted", "pass --password")
        raise self._error("wrong_password", "the password does not open this PDF", "check --password")

    def _render(self, page: int) -> Image:
        import pymupdf
        from PIL import Image as PILImage

        p = self._doc.load_page(page - 1)
        if self.kind == "epub" and (lost := _LOST_CHAPTER.fullmatch(p.get_text().strip())):
            raise self._error("corrupt", f"page {page} could not be decoded: its chapter {lost[1]} is missing or "
                              "cannot be read (damaged, or encrypted by DRM)")
        rect = p.rect  # at (0, 0), rotation already applied
        if rect.width <= 0 or rect.height <= 0:
            raise self._error("corrupt", f"page {page} has an empty page box")
        wanted = self._dpi / 72 if self._dpi else self._longest_side / max(rect.width, rect.height)
        scale = min(wanted, math.sqrt(MAX_PIXELS / (rect.width * rect.height)))
        while (r := (rect * pymupdf.Matrix(scale, scale)).irect).width * r.height > MAX_PIXELS:
            scale *= 0.999
        if scale < wanted * 0.99:
            self._notes[page] = ["downscaled"]
        if self.kind == "cbz":
            pymupdf.TOOLS.reset_mupdf_warnings()
        pix = p.get_pixmap(matrix=pymupdf.Matrix(scale, scale), colorspace=pymupdf.csRGB, alpha=False)
        image = PILImage.frombytes("RGB", (pix.width, pix.height), pix.samples, "raw", "RGB", pix.stride)
        said = pymupdf.TOOLS.mupdf_warnings() if self.kind == "cbz" else ""
        if "error" in said and all(low == high for low, high in image.getextrema()):  # not a blank page: a broken one
            raise self._error("corrupt", f"page {page}'s image could not be decoded ({said.splitlines()[0][:120]})")
        return image

    def close(self) -> None:
        self._doc.close()


def without_hidden(data: bytes) -> bytes:
    """A CBZ without its hidden entries (`__MACOSX/` AppleDouble files, dot-files), which MuPDF would count as pages;
    `data` itself when it has none or its directory cannot be read (MuPDF judges it)."""
    import zipfile

    def hidden(name: str) -> bool:
        return any(part.startswith((".", "__MACOSX")) for part in name.split("/"))

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as src:
            if not any(hidden(info.filename) for info in src.infolist()):
                return data
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as dst:
                for info in src.infolist():
                    if not hidden(info.filename):
                        dst.writestr(info, src.read(info))
            return out.getvalue()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
        return data


# RFC 4013 2.3: non-ASCII space, control, private use, non-character, surrogate, and tables C.6 to C.9
_PROHIBITED = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
               stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
               stringprep.in_table_c9)


def saslprep(text: str) -> str | None:
    """The SASLprep form (RFC 4013: PDF 2.0's for AES-256 passwords; unassigned code points allowed) of `text`, or
    None when RFC 4013 prohibits it."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    if any(check(c) for c in prepared for check in _PROHIBITED):
        return None
    if any(stringprep.in_table_d1(c) for c in prepared):  # right-to-left text: RFC 3454 section 6
        if any(stringprep.in_table_d2(c) for c in prepared):
            return None
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return None
    return prepared


def candidates(password: str) -> list[str]:
    """The password as typed, then its SASLprep form when that is different and allowed."""
    prepared = saslprep(password)
    return [password] if prepared in (None, password) else [password, prepared]


def page_objects(doc) -> int:
    """How many objects in the file say /Type /Page."""
    return sum(1 for xref in range(1, doc.xref_length()) if doc.xref_get_key(xref, "Type") == ("name", "/Page"))


def empty_page_tree(doc) -> bool:
    """A 0-page PDF whose page tree is really empty (no kids, no page objects), not damaged."""
    catalog = doc.pdf_catalog()
    if catalog <= 0:
        return False
    kids = doc.xref_get_key(catalog, "Pages/Kids")
    return kids[0] == "array" and kids[1].strip("[] \n\r\t") == "" and page_objects(doc) == 0


# key lengths in bytes: revision -> (minimum length of /O and /U, exact length of /OE and /UE or None)
_KEY_LENGTHS = {2: (32, None), 3: (32, None), 4: (32, None), 5: (48, 32), 6: (48, 32)}
_METHODS = ("/None", "/V2", "/AESV2", "/AESV3", "/Identity", "null")


def encryption_damage(doc) -> str | None:
    """Why no password can open a PDF, or None when its encryption dictionary is sound."""
    def key(name: str) -> tuple[str, str]:
        return doc.xref_get_key(-1, f"Encrypt/{name}")

    kind, filter_ = key("Filter")
    if kind == "null":
        return None
    if filter_ != "/Standard":
        return f"it is encrypted with the {filter_.lstrip('/')} security handler, which only its vendor's tools open"
    kind, revision = key("R")
    if kind != "int" or int(revision) not in _KEY_LENGTHS:
        return f"its encryption dictionary names an unknown revision ({revision})"
    at_least, exactly = _KEY_LENGTHS[int(revision)]
    for name, need in [("O", at_least), ("U", at_least)] + ([("OE", exactly), ("UE", exactly)] if exactly else []):
        kind, value = key(name)
        if kind != "string" or (len(value) != need if name.endswith("E") else len(value) < need):
            size = f"{len(value)} bytes" if kind == "string" else "missing"
            return f"its encryption dictionary is damaged: /{name} is {size}, revision {revision} needs {need}"
    for name in ("StmF", "StrF"):
        kind, value = key(name)
        if kind == "name" and value not in ("/Identity",):
            method = key(f"CF/{value.lstrip('/')}/CFM")[1]
            if method not in _METHODS:
                return f"its encryption dictionary names an unknown method ({method.lstrip('/')})"
    return None
