"""Documents: a file (or stdin) in, RGB page images out; the only package that decodes.

Contract: `open_document(path, ...)` reads the bytes once, hashes them (`sha256`), decides the format from them
(`sniff`, never the name) and has a worker process (worker.py) open it: MuPDF's formats by pdf.py, images by
images.py. A Document is a context manager, one per thread. Every failure is an `IdeficsError` with `path` set
and an input code of errors.py; decoders' chatter never reaches stderr unless IDEFICS_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import sys

from idefics_cli.documents.images import ImageDocument
from idefics_cli.documents.pages import DEFAULT_LONGEST_SIDE, MAX_IMAGE_PIXELS, MAX_PIXELS, Document
from idefics_cli.documents.pdf import PdfDocument
from idefics_cli.documents.sniff import FORMATS, MUPDF_FORMATS, NAMES, damaged_signature, sniff
from idefics_cli.documents.worker import DecodeTimeout, Remote
from idefics_cli.errors import IdeficsError, UsageError

__all__ = ["DEFAULT_LONGEST_SIDE", "FORMATS", "MAX_IMAGE_PIXELS", "MAX_PIXELS", "Document", "ImageDocument",
           "PdfDocument", "open_document", "sniff"]

_SUPPORTED = ("supported: PDF, XPS, EPUB, MOBI, FB2, CBZ, SVG, PNG, JPEG, JPEG 2000, WebP, GIF, BMP, TIFF, netpbm, "
              "AVIF, HEIC, PSD")


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
        raise IdeficsError("corrupt", f"cannot read the file ({e.strerror or e})", path=path) from None


def open_here(path: str, kind: str, data: bytes, password: str | None, dpi: int | None, longest_side: int
              ) -> Document:
    """The document decoded in this process: a worker's side of `open_document`."""
    if kind in MUPDF_FORMATS:
        return PdfDocument(path, data, password, dpi, longest_side, kind)
    return ImageDocument(path, kind, data)


def open_document(path: str, *, password: str | None = None, dpi: int | None = None, longest_side: int | None = None,
                  data: bytes | None = None) -> Document:
    """Open `path` ("-" = stdin; or `data`); `longest_side`: PDF pages' size without `dpi` (DEFAULT_LONGEST_SIDE)."""
    path = os.fspath(path)
    longest_side = DEFAULT_LONGEST_SIDE if longest_side is None else longest_side
    if dpi is not None and dpi <= 0:
        raise UsageError(f"--dpi must be a positive number, not {dpi}")
    if longest_side <= 0:
        raise UsageError(f"the longest side must be a positive number of pixels, not {longest_side}")
    if data is None:
        data = _read(path)
    if not data:
        raise IdeficsError("empty_document", "the file is empty", path=path)
    kind = sniff(data)
    if kind is None:
        damaged = damaged_signature(data, path)
        if damaged is not None:
            raise IdeficsError("corrupt", f"the file is named as {NAMES[damaged]} but its signature is damaged (a "
                               "flipped bit, or line endings rewritten by a text-mode transfer)", path=path)
        if data[:4] == b"8BPS":
            raise IdeficsError("unsupported_format", "PSB (Photoshop's large document format) is not supported",
                               "save it as PSD or PNG", path)
        raise IdeficsError("unsupported_format", f"not a supported document ({_SUPPORTED})", path=path)

    try:
        return Remote(path, kind, data, password, dpi, longest_side)
    except DecodeTimeout as e:
        raise IdeficsError("corrupt", f"the {NAMES[kind]} file {e} to open, given up", path=path) from None
