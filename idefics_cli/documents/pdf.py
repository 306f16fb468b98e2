"""MuPDF documents through PyMuPDF: PDF, XPS/OXPS, EPUB, MOBI, FB2, CBZ and SVG, paginated as MuPDF does.

Contract: a page's longest side is `longest_side` px, or it is rendered at `dpi`, rotation honored, within
`MAX_PIXELS` (else `downscaled`). No JavaScript runs, no attachment is extracted. 0 pages is `empty_document`
only for an empty page tree, else `corrupt`, as is a damaged encryption dictionary. A ZIP container whose
entries expand past MAX_ARCHIVE_BYTES, or hold an image over MAX_IMAGE_PIXELS, is `image_too_large`.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import TYPE_CHECKING

from idefics_cli.documents import damage
from idefics_cli.documents.base import MAX_IMAGE_PIXELS, MAX_PIXELS, Document, why
from idefics_cli.documents.passwords import candidates
from idefics_cli.documents.sniff import NAMES
from idefics_cli.documents.variants import zip_excess
from idefics_cli.errors import IdeficsError

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_ARCHIVE_BYTES = 1 << 30  # what the entries of an EPUB, CBZ or XPS may expand to, in all


def _zip_images_over(data: bytes) -> str | None:
    """The first image in a ZIP container (CBZ, EPUB, XPS) whose header declares more than MAX_IMAGE_PIXELS."""
    import zipfile

    from PIL import Image as PILImage

    bad_zip = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError)
    with contextlib.suppress(*bad_zip), zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.file_size < 8 or info.is_dir():
                continue
            with archive.open(info) as entry:
                head = entry.read(1 << 16)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    width, height = PILImage.open(io.BytesIO(head)).size
            except PILImage.DecompressionBombError as e:
                return f"{info.filename}: {why(e)}"
            except Exception:  # noqa: BLE001 - not an image Pillow knows, or its header is further on
                continue
            if width * height > MAX_IMAGE_PIXELS:
                return f"{info.filename} is {width}x{height} pixels"
    return None


class PdfDocument(Document):
    """A document MuPDF opens: PDF, and XPS/OXPS, EPUB, MOBI, FB2, CBZ and SVG, paginated by MuPDF."""

    def __init__(self, path: str, data: bytes, password: str | None, dpi: int | None, longest_side: int,
                 kind: str = "pdf"):
        super().__init__(path, kind, data)
        self._dpi, self._longest_side = dpi, longest_side
        name = NAMES[kind]
        if kind in ("epub", "cbz", "xps"):
            excess = zip_excess(data, MAX_ARCHIVE_BYTES)
            if excess:
                raise self._error("image_too_large", f"the {name} is too large: {excess}")
            if kind != "xps" and (big := _zip_images_over(data)):
                raise self._error("image_too_large", f"the {name} holds an image over the limit of "
                                  f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels ({big})", "downscale it first")
        import pymupdf

        try:
            self._doc = pymupdf.open(stream=data, filetype=kind)
        except Exception as e:
            raise self._error("corrupt", f"not a readable {name} ({why(e)})") from e
        try:
            if self._doc.needs_pass:
                self._authenticate(password)
            self.page_count = self._doc.page_count
            if self.page_count == 0 and kind != "pdf":
                raise self._error("empty_document", f"the {name} has no pages")
            if self.page_count == 0:
                if not damage.empty_page_tree(self._doc):
                    found = damage.page_objects(self._doc)
                    raise self._error("corrupt", f"the PDF is damaged: its page tree reaches none of its {found} "
                                      "page objects" if found else "the PDF is damaged and no page could be recovered")
                raise self._error("empty_document", "the PDF has no pages")
            if kind != "pdf":
                return
            if self._doc.is_repaired:
                self.doc_warnings.append("repaired")
            catalog = self._doc.pdf_catalog()
            if catalog > 0 and self._doc.xref_get_key(catalog, "AcroForm/XFA")[0] != "null":
                self.doc_warnings.append("xfa_form")
        except BaseException as e:
            self._doc.close()
            if isinstance(e, (IdeficsError, KeyboardInterrupt, MemoryError)):
                raise
            raise self._error("corrupt", f"not a readable {name} ({why(e)})") from e

    def _authenticate(self, password: str | None) -> None:
        """Open an encrypted PDF; AES-256 passwords are tried as typed, then SASLprep-normalised (PDF 2.0)."""
        if password is not None and any(self._doc.authenticate(p) for p in candidates(password)):
            return
        why = damage.encryption_damage(self._doc)
        if why:
            raise self._error("corrupt", f"the PDF cannot be decrypted with any password: {why}")
        if password is None:
            raise self._error("encrypted", "the PDF is encrypted", "pass --password")
        raise self._error("wrong_password", "the password does not open this PDF", "check --password")

    def _render(self, page: int) -> Image:
        import pymupdf
        from PIL import Image as PILImage

        p = self._doc.load_page(page - 1)
        rect = p.rect  # at (0, 0), rotation already applied
        if rect.width <= 0 or rect.height <= 0:
            raise self._error("corrupt", f"page {page} has an empty page box")
        wanted = self._dpi / 72 if self._dpi else self._longest_side / max(rect.width, rect.height)
        scale = min(wanted, math.sqrt(MAX_PIXELS / (rect.width * rect.height)))
        while (r := (rect * pymupdf.Matrix(scale, scale)).irect).width * r.height > MAX_PIXELS:
            scale *= 0.999
        if scale < wanted * 0.99:
            self._notes[page] = ["downscaled"]
        pix = p.get_pixmap(matrix=pymupdf.Matrix(scale, scale), colorspace=pymupdf.csRGB, alpha=False)
        return PILImage.frombytes("RGB", (pix.width, pix.height), pix.samples, "raw", "RGB", pix.stride)

    def close(self) -> None:
        self._doc.close()


