"""The opened document every format shares: pages rendered on demand, their warnings, one-line errors.

Contract: `render(page)` (1-based) gives a fresh RGB image or raises `page_out_of_range` or `corrupt` (`path`
set); `warnings(page)` names what may be wrong with a rendered page. `why(exc)`: one line on an exception.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from idefics_cli.documents.pages import out_of_range
from idefics_cli.errors import IdeficsError

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_LONGEST_SIDE = 1960  # 2 x 980: the four crops reach the processor at full resolution
MAX_PIXELS = DEFAULT_LONGEST_SIDE * DEFAULT_LONGEST_SIDE * 4  # ~15.4 MP budget for one rendered PDF page
MAX_IMAGE_PIXELS = 178_956_970  # images above this are refused before decoding (2x Pillow's default limit)


def why(exc: BaseException) -> str:
    """One line on an exception; for MuPDF's, the innermost reason ("cycle in page tree"), without its code."""
    while exc.__cause__ is not None and type(exc).__module__.startswith("pymupdf"):
        exc = exc.__cause__
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if type(exc).__module__.startswith("pymupdf") and text:
        return re.sub(r"^code=\d+: ", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
