"""Documents: a file (or stdin) in, RGB page images out. The only module that decodes PDFs and images.

Contract:
- `open_document(path, ...)` reads the source bytes exactly once (from `path`, from stdin for "-", or from
  `data` when given), hashes them (`Document.sha256`), decides the format from magic bytes with `sniff()`
  (never from the extension) and opens it from memory. `Document.page_count` is known after opening;
  `Document.render(page)` (1-based) returns a fresh RGB `PIL.Image.Image`; `Document.warnings(page)` then
  names what may be wrong with it (errors.WARNINGS: blank_page, xfa_form, repaired, downscaled,
  first_frame_only). A Document is a context manager and is not thread-safe: use one per thread.
- PDF (PyMuPDF): each page is rendered so its longest side is `longest_side` px (default 1960), or at
  `dpi` when given, page rotation honored, never above `MAX_PIXELS`. Pages are only rasterized: no
  JavaScript is run, no attachment or embedded file is extracted. 0 pages is `empty_document` only for an
  empty page tree, else `corrupt`; a damaged encryption dictionary is `corrupt`, not a password question;
  AES-256 passwords are also tried SASLprep-normalised (damage.py, passwords.py).
- Images (Pillow): PNG, JPEG, WebP, GIF (first frame only), BMP, TIFF (every frame is a page). EXIF
  orientation is applied, transparency is composited onto white, every mode ends as RGB (deep gray scaled by
  its real range: a 12-bit TIFF by 4095); a PNG cut off after its pixel data is read. Images are
  never resized: the model's processor does that, so we feed it what plain Pillow code would (an image
  1 px wide or high is padded with white to 2 px, since the processor cannot split it).
- Every failure is an `IdeficsError` with `path` set and one of the codes: not_found, permission_denied,
  unsupported_format, corrupt, encrypted, wrong_password, empty_document, page_out_of_range,
  image_too_large. PyMuPDF and Pillow are imported lazily, so importing this module is cheap; libtiff's
  own stderr messages are turned off (IDEFICS_DEBUG=1 keeps them).
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING

from idefics_cli import damage
from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.pages import out_of_range
from idefics_cli.passwords import candidates

if TYPE_CHECKING:
    from PIL.Image import Image

FORMATS = ("pdf", "png", "jpeg", "webp", "gif", "bmp", "tiff")
DEFAULT_LONGEST_SIDE = 1960  # 2 x 980: the four crops reach the processor at full resolution
MAX_PIXELS = DEFAULT_LONGEST_SIDE * DEFAULT_LONGEST_SIDE * 4  # ~15.4 MP budget for one rendered PDF page
MAX_IMAGE_PIXELS = 178_956_970  # images above this are refused before decoding (2x Pillow's default limit)

_SUPPORTED = "supported formats: PDF, PNG, JPEG, WebP, GIF, BMP, TIFF"
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)
_pymupdf_ready = False
_libtiff_quiet = False


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (1024 are enough): one of FORMATS, or None."""
    head = bytes(head[:1024])
    if head.startswith(b"%PDF-"):
        return "pdf"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if b"%PDF-" in head:  # PDF readers accept junk before the header
        return "pdf"
    return None


def _why(exc: BaseException) -> str:
    """One line on an exception; for MuPDF's, the innermost reason ("cycle in page tree"), without its code."""
    while exc.__cause__ is not None and type(exc).__module__.startswith("pymupdf"):
        exc = exc.__cause__
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if type(exc).__module__.startswith("pymupdf") and text:
        return re.sub(r"^code=\d+: ", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _pymupdf():
    """Import PyMuPDF once, with MuPDF's messages kept off stdout (they go to the `pymupdf` logger)."""
    global _pymupdf_ready
    import pymupdf

    if not _pymupdf_ready:
        pymupdf.TOOLS.mupdf_display_errors(False)
        pymupdf.TOOLS.mupdf_display_warnings(False)
        pymupdf.set_messages(pylogging=True)
        pymupdf.set_log(pylogging=True)
        _pymupdf_ready = True
    return pymupdf


def _quiet_libtiff() -> None:
    """Turn off libtiff's message handlers: they print straight to file descriptor 2, past any Python redirection
    ("PackBitsDecode: Not enough data for scanline 0."), while the failure reaches us as Pillow's OSError anyway.
    Process-wide and thread-safe, unlike redirecting fd 2; IDEFICS_DEBUG=1 keeps them."""
    global _libtiff_quiet
    if _libtiff_quiet or os.environ.get("IDEFICS_DEBUG"):
        return
    _libtiff_quiet = True
    try:
        import ctypes

        from PIL import _imaging

        lib = ctypes.CDLL(_imaging.__file__)  # already loaded: dlsym finds libtiff among its dependencies
        for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler", "TIFFSetErrorHandlerExt",
                     "TIFFSetWarningHandlerExt"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                setter(None)
    except (ImportError, OSError, AttributeError):  # no libtiff in this Pillow: nothing to quiet
        pass


class Document:
    """An opened document: `path`, `kind` (one of FORMATS), `sha256` of the source bytes, `page_count`."""

    def __init__(self, path: str, kind: str, data: bytes):
        self.path = path
        self.kind = kind
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.page_count = 0
        self.doc_warnings: list[str] = []  # true of every page: repaired, xfa_form, first_frame_only
        self._warnings: dict[int, list[str]] = {}
        self._notes: dict[int, list[str]] = {}  # found while rendering a page: downscaled

    def _error(self, code: str, message: str, hint: str | None = None) -> IdeficsError:
        return IdeficsError(code, message, hint, self.path)

    def render(self, page: int) -> Image:
        """Page `page` (1-based) as a new RGB image; a page that cannot be decoded raises `corrupt`."""
        if not 1 <= page <= self.page_count:
            err = out_of_range(page, self.page_count)
            err.path = self.path
            raise err
        try:
            image = self._render(page)
        except (IdeficsError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise self._error("corrupt", f"page {page} could not be decoded ({_why(e)})") from e
        blank = ["blank_page"] if all(low == high for low, high in image.getextrema()) else []
        self._warnings[page] = [*self.doc_warnings, *self._notes.pop(page, []), *blank]
        return image

    def warnings(self, page: int) -> list[str]:
        """Warning codes of a page (see WARNINGS in errors.py); complete once the page has been rendered."""
        return list(self._warnings.get(page, self.doc_warnings))

    def _render(self, page: int) -> Image:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Document:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} {self.kind} pages={self.page_count}>"


class PdfDocument(Document):
    def __init__(self, path: str, data: bytes, password: str | None, dpi: int | None, longest_side: int):
        super().__init__(path, "pdf", data)
        self._dpi, self._longest_side = dpi, longest_side
        pymupdf = _pymupdf()
        try:
            self._doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as e:
            raise self._error("corrupt", f"not a readable PDF ({_why(e)})") from e
        try:
            if self._doc.needs_pass:
                self._authenticate(password)
            self.page_count = self._doc.page_count
            if self.page_count == 0:
                if not damage.empty_page_tree(self._doc):
                    found = damage.page_objects(self._doc)
                    raise self._error("corrupt", f"the PDF is damaged: its page tree reaches none of its {found} "
                                      "page objects" if found else "the PDF is damaged and no page could be recovered")
                raise self._error("empty_document", "the PDF has no pages")
            if self._doc.is_repaired:
                self.doc_warnings.append("repaired")
            catalog = self._doc.pdf_catalog()
            if catalog > 0 and self._doc.xref_get_key(catalog, "AcroForm/XFA")[0] != "null":
                self.doc_warnings.append("xfa_form")
        except BaseException as e:
            self._doc.close()
            if isinstance(e, (IdeficsError, KeyboardInterrupt, MemoryError)):
                raise
            raise self._error("corrupt", f"not a readable PDF ({_why(e)})") from e

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

    def scale_for(self, width: float, height: float) -> float:
        """Zoom factor for a page of `width` x `height` points (rotation applied), within MAX_PIXELS."""
        pymupdf = _pymupdf()
        scale = self._dpi / 72 if self._dpi else self._longest_side / max(width, height)
        scale = min(scale, math.sqrt(MAX_PIXELS / (width * height)))
        rect = pymupdf.Rect(0, 0, width, height)
        while (r := (rect * pymupdf.Matrix(scale, scale)).irect).width * r.height > MAX_PIXELS:
            scale *= 0.999
        return scale

    def _render(self, page: int) -> Image:
        from PIL import Image as PILImage

        pymupdf = _pymupdf()
        p = self._doc.load_page(page - 1)
        rect = p.rect  # rotation already applied
        if rect.width <= 0 or rect.height <= 0:
            raise self._error("corrupt", f"page {page} has an empty page box")
        scale = self.scale_for(rect.width, rect.height)
        wanted = self._dpi / 72 if self._dpi else self._longest_side / max(rect.width, rect.height)
        if scale < wanted * 0.99:
            self._notes[page] = ["downscaled"]
        pix = p.get_pixmap(matrix=pymupdf.Matrix(scale, scale), colorspace=pymupdf.csRGB, alpha=False)
        return PILImage.frombytes("RGB", (pix.width, pix.height), pix.samples, "raw", "RGB", pix.stride)

    def close(self) -> None:
        self._doc.close()


class ImageDocument(Document):
    def __init__(self, path: str, kind: str, data: bytes):
        super().__init__(path, kind, data)
        from PIL import Image as PILImage

        _quiet_libtiff()
        if kind == "png" and not data.endswith(damage.IEND):
            data = damage.complete_png(data) or data  # cut after its pixel data: read what is all there
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                self._im = PILImage.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
        except PILImage.DecompressionBombError as e:
            raise self._error("image_too_large", f"the image is too large ({e})", "downscale it first") from e
        except PILImage.UnidentifiedImageError as e:
            raise self._error("corrupt", f"not a readable {kind.upper()} image") from e
        except Exception as e:
            raise self._error("corrupt", f"not a readable {kind.upper()} image ({_why(e)})") from e
        try:
            self._check_size()
            # TIFF: every frame is a page; GIF, animated PNG/WebP: the first frame only.
            self.page_count = getattr(self._im, "n_frames", 1) if kind == "tiff" else 1
            if kind != "tiff" and getattr(self._im, "n_frames", 1) > 1:
                self.doc_warnings.append("first_frame_only")
        except BaseException as e:
            self._im.close()
            if isinstance(e, (IdeficsError, KeyboardInterrupt, MemoryError)):
                raise
            raise self._error("corrupt", f"not a readable {kind.upper()} image ({_why(e)})") from e

    def _check_size(self) -> None:
        w, h = self._im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise self._error(
                "image_too_large",
                f"the image is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS // 1_000_000} megapixels",
                "downscale it first",
            )

    def _render(self, page: int) -> Image:
        from PIL import Image as PILImage
        from PIL import ImageOps

        im = self._im
        if self.kind == "tiff":
            im.seek(page - 1)
            self._check_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            im.load()  # decode fully here, so truncated data fails now, as `corrupt`
        bits = _bits_per_sample(im)
        try:
            out = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block must not lose the page
            out = im.copy()
        return _at_least_two_pixels(_to_rgb(out, bits))

    def close(self) -> None:
        self._im.close()


def _at_least_two_pixels(im: Image) -> Image:
    """Pad a 1-pixel-wide or -high image with white: the processor cannot split it into crops otherwise."""
    from PIL import Image as PILImage

    if im.width >= 2 and im.height >= 2:
        return im
    out = PILImage.new("RGB", (max(im.width, 2), max(im.height, 2)), (255, 255, 255))
    out.paste(im, (0, 0))
    return out


def _bits_per_sample(im: Image) -> int | None:
    """The bits per sample a TIFF declares (12-bit scans arrive in 16-bit containers), else None."""
    tags = getattr(im, "tag_v2", None)
    value = tags.get(258) if tags is not None else None
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and 1 <= value <= 32 else None


def _to_rgb(im: Image, bits: int | None = None) -> Image:
    """Any Pillow mode -> RGB: deep gray scaled by its real range (`bits`, default 16) to 8 bits, float gray in
    [0, 1] to 0-255, transparency composited onto white."""
    from PIL import Image as PILImage

    if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 12-, 16- or 32-bit samples (PNG, TIFF)
        top = (1 << (bits if bits and bits > 8 else 16)) - 1
        im = im.convert("I").point(lambda v: v * (255 / top), "L")
    elif im.mode == "F":  # 32-bit float samples: scientific TIFFs hold 0..1
        low, high = im.getextrema()
        im = im.point(lambda v: v * 255, "L") if 0 <= low and high <= 1 else im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = PILImage.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def _read(path: str) -> bytes:
    if path == "-":
        stdin = sys.stdin
        if stdin is None or stdin.isatty():
            raise UsageError("'-' reads a document from stdin, but nothing is piped in", "cat doc.pdf | idefics ...")
        return getattr(stdin, "buffer", stdin).read()
    if os.path.isdir(path):
        raise IdeficsError("unsupported_format", "is a directory, not a document", "pass a file", path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise IdeficsError("not_found", "no such file", "check the path", path) from None
    except PermissionError:
        raise IdeficsError("permission_denied", "permission denied", "check the file's permissions", path) from None
    except IsADirectoryError:
        raise IdeficsError("unsupported_format", "is a directory, not a document", "pass a file", path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IdeficsError("not_found", "a loop of symbolic links", "check the link", path) from None
        raise IdeficsError("corrupt", f"cannot read the file ({e.strerror or e})", path=path) from None


def open_document(
    path: str,
    *,
    password: str | None = None,
    dpi: int | None = None,
    longest_side: int = DEFAULT_LONGEST_SIDE,
    data: bytes | None = None,
) -> Document:
    """Open `path` ("-" = stdin; `data`, when given, is used instead of reading). See the module docstring."""
    path = os.fspath(path)
    if dpi is not None and dpi <= 0:
        raise UsageError(f"--dpi must be a positive number, not {dpi}")
    if longest_side <= 0:
        raise UsageError(f"the longest side must be a positive number of pixels, not {longest_side}")
    if data is None:
        data = _read(path)
    if not data:
        raise IdeficsError("empty_document", "the file is empty", path=path)
    kind = sniff(data[:1024])
    if kind is None:
        raise IdeficsError("unsupported_format", f"not a supported document ({_SUPPORTED})", path=path)
    if kind == "pdf":
        return PdfDocument(path, data, password, dpi, longest_side)
    return ImageDocument(path, kind, data)
