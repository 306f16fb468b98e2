"""Documents: a file (or stdin) in, RGB page images out; the only package that decodes.

Contract: `open_document(path, ...)` reads the bytes once, hashes them (`sha256`), decides the format from them
(`sniff`: one of FORMATS or None, never from the name) and has a worker process (worker.py) open it: MuPDF's
formats by pdf.py, images by images.py; a Document (a context manager) per thread. Failures are `IdeficsError`s
with `path` set and an input code of errors.py; decoders' chatter reaches stderr only with IDEFICS_DEBUG=1.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys
from collections.abc import Iterable

from idefics_cli.documents.images import ImageDocument
from idefics_cli.documents.pages import DEFAULT_LONGEST_SIDE, IMAGE_NAMES, MAX_IMAGE_PIXELS, MAX_PIXELS, NAMES, Document
from idefics_cli.documents.pdf import PdfDocument
from idefics_cli.documents.worker import Remote
from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.interface import DPI_RANGE, check_option

__all__ = ["DEFAULT_LONGEST_SIDE", "FORMATS", "MAX_IMAGE_PIXELS", "MAX_PIXELS", "Document", "ImageDocument",
           "PdfDocument", "open_document", "sniff"]

FORMATS = tuple(NAMES)
MUPDF_FORMATS = ("pdf", "xps", "epub", "mobi", "fb2", "cbz", "svg")
_SUPPORTED = ("supported: PDF, XPS, EPUB, MOBI, FB2, CBZ, SVG, PNG, JPEG, JPEG 2000, WebP, GIF, BMP, TIFF, netpbm, "
              "AVIF, HEIC, PSD")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),  # JP2, JPX and JPF files
    (b"\xffO\xffQ", "jp2"),  # a bare JPEG 2000 codestream (.j2k, .j2c)
    (b"8BPS\x00\x01", "psd"),
)
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")  # what Windows leaves in a folder of scans zipped as a comic
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_PNM = re.compile(rb"P[1-6](?:\s|#)+(?:#[^\n]*\n\s*)*\d")
# XML declaration, comments and a DOCTYPE (its internal subset `[...]` too, as Adobe Illustrator writes it)
_XML_PROLOG = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*\?>\s*|<!--.*?-->\s*"
                         rb"|<!DOCTYPE[^>\[]*(?:\[.*?\]\s*)?>\s*)*", re.S)
_XML_HEAD = 1 << 16  # how far an SVG's or FB2's root element may sit behind its prolog
# file name extensions of the images whose signature a damaged file may still be recognised by
_BY_EXTENSION = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "jpe": "jpeg", "jfif": "jpeg", "gif": "gif",
                 "tif": "tiff", "tiff": "tiff", "bmp": "bmp", "dib": "bmp", "webp": "webp", "jp2": "jp2",
                 "jpx": "jp2", "jpf": "jp2", "psd": "psd"}


def sniff(data: bytes) -> str | None:
    """The format of a file from its bytes (1024 are enough but for XPS and CBZ, and SVG or FB2 behind a long
    prolog: _XML_HEAD): one of FORMATS, or None."""
    head = bytes(data[:1024])
    if head.startswith(b"%PDF-"):
        return "pdf"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if head[4:8] == b"ftyp" and (kind := _iso_brand(head)):
        return kind
    if head[60:68] in (b"BOOKMOBI", b"TEXtREAd"):
        return "mobi"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(data)
    if _PNM.match(head):
        return "pnm"
    if b"%PDF-" in head:  # PDF readers accept junk before the header
        return "pdf"
    return _xml_kind(bytes(data[:_XML_HEAD]))


def _iso_brand(head: bytes) -> str | None:
    """AVIF or HEIF from an ISO base media `ftyp` box: its major brand and compatible brands."""
    size = int.from_bytes(head[:4], "big")
    brands = {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)} | {head[8:12]}
    if brands & _AVIF_BRANDS:
        return "avif"
    return "heif" if brands & _HEIF_BRANDS else None


def _zip_names(data) -> list[str] | None:
    """The file names in a ZIP's directory (`data`: its bytes or a binary file); None when it cannot be read."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as archive:
            return [n for n in archive.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def sniff_file(path: str) -> str | None:
    """`sniff` of a file on disk, reading its first bytes (_XML_HEAD) and, for a ZIP, only its directory."""
    with open(path, "rb") as f:
        head = f.read(_XML_HEAD)
        if head.startswith(b"PK\x03\x04"):
            return _zip_kind(head, f)
    return sniff(head)


def _zip_kind(data: bytes, file=None) -> str | None:
    """EPUB from its first entry (`mimetype`); XPS and CBZ from the names in the ZIP's directory (`file`'s if given)."""
    if data[30:38] == b"mimetype" and data[38:58].startswith(b"application/epub+zip"):
        return "epub"
    names = _zip_names(data if file is None else file)
    if names is None:
        return None
    lower = [n.lower() for n in names]
    if "mimetype" in lower and any(n.endswith(".opf") for n in lower):
        return "epub"
    if any(n.endswith((".fpage", ".fdseq")) for n in lower):
        return "xps"
    pages = [n for n in lower if n.endswith(IMAGE_NAMES)]
    others = [n for n in lower if not n.endswith(IMAGE_NAMES) and not n.endswith((".xml", ".txt", ".nfo"))
              and not os.path.basename(n).startswith(".") and os.path.basename(n) not in _SYSTEM_FILES]
    return "cbz" if pages and not others else None


def _xml_kind(head: bytes) -> str | None:
    """SVG and FB2: XML whose root element is `<svg` or `<FictionBook` (UTF-16 with its byte order mark too)."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        head = head.decode("utf-16", "ignore").encode()
    rest = head[_XML_PROLOG.match(head).end():]
    if rest.startswith(b"<svg"):  # <svg:svg too
        return "svg"
    if rest.startswith(b"<FictionBook"):
        return "fb2"
    return None


def _bit_distance(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b)) + 8 * abs(len(a) - len(b))


def damaged_signature(data: bytes, name: str) -> str | None:
    """The format a refused file's `name` says (an image or a ZIP container) when its signature has a bit or two
    flipped or line endings rewritten (so it is `corrupt`); else None."""
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    kind = _BY_EXTENSION.get(ext)
    head = bytes(data[:64])
    if ext in ("epub", "xps", "oxps", "cbz") and head.startswith(b"PK") and _zip_names(data) is None:
        return "xps" if ext == "oxps" else ext  # a ZIP container whose directory cannot be read
    if kind is None or len(head) < 8:
        return None
    text_mode = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for magic in (m for m, k in _MAGIC if k == kind):  # bits flipped, CRLF made LF, or LF made CRLF
        if (_bit_distance(head[:len(magic)], magic) <= 2 or text_mode.startswith(magic.replace(b"\r\n", b"\n"))
                or head.startswith(magic.replace(b"\n", b"\r\n"))):
            return kind
    if kind == "png" and head[1:4] == b"PNG" and b"IHDR" in head[:40]:
        return kind
    if kind == "webp" and _bit_distance(head[:4] + head[8:12], b"RIFFWEBP") <= 2:
        return kind
    if kind == "bmp" and _bit_distance(head[:2], b"BM") <= 1 and (
            int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES or int.from_bytes(head[2:6], "little") == len(
                data)):
        return kind
    return None


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
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IdeficsError("not_found", "a loop of symbolic links", "check the link", path) from None
        if e.errno == errno.ENAMETOOLONG:  # no such file can exist: not a damaged one
            raise IdeficsError("not_found", "the file name is too long", "check the path", path) from None
        raise IdeficsError("corrupt", f"cannot read the file ({e.strerror or e})", path=path) from None


def open_here(path: str, kind: str, data: bytes, password: str | None, dpi: int | None, longest_side: int
              ) -> Document:
    """The document decoded in this process: a worker's side of `open_document`."""
    if kind in MUPDF_FORMATS:
        return PdfDocument(path, data, password, dpi, longest_side, kind)
    return ImageDocument(path, kind, data)


def document_path(path) -> str | bytes:
    """`os.fspath(path)`; a UsageError for what is not a path (None, a file object, an image, an array) or holds NUL."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise UsageError(f"a document is given by its path (str, bytes or os.PathLike), not {type(path).__name__}",
                         "save it to a file and pass the file's path")
    path = os.fspath(path)
    if ("\0" if isinstance(path, str) else b"\0") in path:
        raise UsageError(f"the document path {path!r} holds a NUL character")
    return path


def document_paths(documents) -> list[str]:
    """One path, or an iterable of them, as str paths (`document_path` each); a file object, an image or None is one
    document, refused."""
    one = isinstance(documents, (str, bytes, os.PathLike)) or not isinstance(documents, Iterable) \
        or hasattr(documents, "read")
    return [os.fsdecode(document_path(p)) for p in ([documents] if one else documents)]


def open_document(path: str, *, password: str | None = None, dpi: int | None = None, longest_side: int | None = None,
                  data: bytes | None = None) -> Document:
    """Open `path` ("-" = stdin; or `data`); `longest_side`: PDF pages' size without `dpi` (DEFAULT_LONGEST_SIDE)."""
    path = document_path(path)
    longest_side = DEFAULT_LONGEST_SIDE if longest_side is None else longest_side
    check_option("dpi", dpi, *DPI_RANGE)
    if not (password is None or isinstance(password, str)):
        raise UsageError(f"the password must be a string, not {type(password).__name__}")
    if longest_side <= 0:
        raise UsageError(f"the longest side must be a positive number of pixels, not {longest_side}")
    if data is None:
        data = _read(path)
    if not data:
        raise IdeficsError("empty_document", "the file is empty", path=path)
    kind = sniff(data)
    if kind is None:
        if data[:6] == b"8BPS\x00\x02":  # before the signature check: PSB is PSD's signature with 2 bits flipped
            raise IdeficsError("unsupported_format", "PSB (Photoshop's large document format) is not supported",
                               "save it as PSD or PNG", path)
        damaged = damaged_signature(data, path)
        if damaged in MUPDF_FORMATS:
            raise IdeficsError("corrupt", f"the file is named as {NAMES[damaged]} but its ZIP directory cannot be "
                               "read (truncated or damaged)", path=path)
        if damaged is not None:
            raise IdeficsError("corrupt", f"the file is named as {NAMES[damaged]} but its signature is damaged (a "
                               "flipped bit, or line endings rewritten by a text-mode transfer)", path=path)
        zipped = data[:4] == b"PK\x03\x04" and _zip_names(data) is not None
        what = "a ZIP archive but not an EPUB, CBZ or XPS" if zipped else "not a supported document"
        raise IdeficsError("unsupported_format", f"{what} ({_SUPPORTED})", path=path)
    return Remote(path, kind, data, password, dpi, longest_side)
