"""Pages: the opened document every format shares (`Document`, pages rendered on demand) and page specs (`--pages`).

Contract: `render(page)` (1-based): a new RGB image, or `page_out_of_range` / `corrupt` (`path` set); `warnings(page)`:
what may be wrong with it. `parse_page_spec(spec)`: a `PageSpec` (`3`, `1-4`, `7-`, `-2` = the last two, comma-
separated; `all` or None: every page) or `UsageError`; `resolve(n_pages)`: pages in the order given, once each, clipped
to the document (none left: `page_out_of_range`); `str(spec)` parses back to an equal spec.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from idefics_cli.errors import IdeficsError, UsageError

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_LONGEST_SIDE = 1960  # 2 x 980: the four crops reach the processor at full resolution
MAX_PIXELS = DEFAULT_LONGEST_SIDE * DEFAULT_LONGEST_SIDE * 4  # ~15.4 MP budget for one rendered PDF page
MAX_IMAGE_PIXELS = 178_956_970  # images above this are refused before decoding (2x Pillow's default limit)
NAMES = {"pdf": "PDF", "png": "PNG", "jpeg": "JPEG", "webp": "WebP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
         "jp2": "JPEG 2000", "pnm": "netpbm", "avif": "AVIF", "heif": "HEIF", "psd": "PSD", "xps": "XPS",
         "epub": "EPUB", "mobi": "MOBI", "fb2": "FB2", "cbz": "CBZ", "svg": "SVG"}
IMAGE_NAMES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".jpx", ".avif")  # in a CBZ
# One comma-separated item: "N", "N-", "N-M" or "-N" (ASCII digits only).
_ITEM = re.compile(r"(?:(?P<start>[0-9]+)\s*(?:(?P<dash>-)\s*(?P<end>[0-9]+)?)?|-\s*(?P<tail>[0-9]+))", re.ASCII)
_HINT = "use 1-based pages, e.g. 3, 1-4, 1,3,7- or -2 for the last two"


@dataclass(frozen=True)
class PageRange:
    """`start`..`end` inclusive; `end=None` runs to the last page; a negative `start` is the last -`start` pages."""

    start: int
    end: int | None = None

    def __str__(self) -> str:
        if self.start < 0 or self.start == self.end:
            return str(self.start)
        return f"{self.start}-" if self.end is None else f"{self.start}-{self.end}"


@dataclass(frozen=True)
class PageSpec:
    """A parsed page spec; no ranges means every page."""

    ranges: tuple[PageRange, ...] = ()

    def __str__(self) -> str:
        return ",".join(map(str, self.ranges)) or "all"

    def resolve(self, n_pages: int) -> list[int]:
        """1-based page numbers in spec order, once each, clipped to `n_pages`; none left: `page_out_of_range`."""
        if not self.ranges:
            return list(range(1, n_pages + 1))
        pages: dict[int, None] = {}
        for r in self.ranges:
            first = max(n_pages + r.start + 1, 1) if r.start < 0 else r.start
            last = n_pages if r.end is None else min(r.end, n_pages)
            pages.update(dict.fromkeys(range(first, last + 1)))
        if not pages:
            noun = "page" if n_pages == 1 else "pages"
            raise IdeficsError("page_out_of_range",
                               f"none of the chosen pages ({self}) is in the document (it has {n_pages} {noun})")
        return list(pages)


def parse_page_spec(spec: str | None) -> PageSpec:
    """Parse `--pages` text (see the module docstring), or one page number as an int; `None` or `all`: every page."""
    if spec is None:
        return PageSpec()
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        spec = str(spec)
    if not isinstance(spec, str):
        raise UsageError(f"bad page spec {spec!r}: give a string such as '1-3,7'", hint=_HINT)
    text = spec.strip()
    if not text:
        raise UsageError("empty page spec", hint=_HINT)
    if text.lower() == "all":
        return PageSpec()
    ranges = []
    for raw in text.split(","):
        item = raw.strip()
        m = _ITEM.fullmatch(item)
        if m and max(len(g or "") for g in m.groupdict().values()) > 12:
            raise UsageError(f"bad page spec {spec!r}: page number too large", hint=_HINT)
        if not m:
            what = "an empty item" if not item else repr(item)
            raise UsageError(f"bad page spec {spec!r}: {what} is not a page or range", hint=_HINT)
        first = int(m["tail"] or m["start"])
        end = int(m["end"]) if m["end"] else None if m["dash"] or m["tail"] else first
        if first < 1:
            raise UsageError(f"bad page spec {spec!r}: pages are numbered from 1", hint=_HINT)
        if end is not None and end < first:
            raise UsageError(f"bad page spec {spec!r}: range {item!r} runs backwards", hint=_HINT)
        ranges.append(PageRange(-first if m["tail"] else first, end))
    return PageSpec(tuple(ranges))


def why(exc: BaseException) -> str:
    """One line on an exception; for MuPDF's, the innermost reason ("cycle in page tree"), without its code."""
    while exc.__cause__ is not None and type(exc).__module__.startswith("pymupdf"):
        exc = exc.__cause__
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if type(exc).__module__.startswith("pymupdf") and text:
        return re.sub(r"^code=\d+: ", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Document:
    """An opened document: `path`, `kind` (a key of NAMES), `sha256` of the source bytes, `page_count`."""

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
            noun = "page" if self.page_count == 1 else "pages"
            raise self._error("page_out_of_range", f"page {page} is out of range (the document has "
                              f"{self.page_count} {noun})")
        try:
            image = self._render(page)
        except (IdeficsError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise self._error("corrupt", f"page {page} could not be decoded ({why(e)})") from e
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
