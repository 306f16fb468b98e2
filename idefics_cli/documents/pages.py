"""Page specs: which pages of a document to use (the `--pages` option).

Contract: `parse_page_spec(spec)` gives a `PageSpec` or raises `UsageError`: `3`, `1-4`, `7-` (to the end),
`-2` (the last two), comma-separated, `all` or None for every page. `PageSpec.resolve(n_pages)`: 1-based pages
in the order given, each once, clipped to the document; `page_out_of_range` when none exists. `str(spec)`
parses back to an equal spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from idefics_cli.errors import IdeficsError, UsageError

# One comma-separated item: "N", "N-", "N-M" or "-N" (ASCII digits only).
_ITEM = re.compile(r"(?:(?P<start>[0-9]+)\s*(?:(?P<dash>-)\s*(?P<end>[0-9]+)?)?|-\s*(?P<tail>[0-9]+))", re.ASCII)
_HINT = "use 1-based pages, e.g. 3, 1-4, 1,3,7- or -2 for the last two"


def out_of_range(page: int, n_pages: int) -> IdeficsError:
    """The `page_out_of_range` error for `page` in a document of `n_pages` pages."""
    noun = "page" if n_pages == 1 else "pages"
    return IdeficsError("page_out_of_range", f"page {page} is out of range (the document has {n_pages} {noun})")


@dataclass(frozen=True)
class PageRange:
    """`start`..`end` inclusive; `end=None` runs to the last page; `tail=N` (start/end unused) is the last N."""

    start: int = 0
    end: int | None = None
    tail: int = 0

    def __str__(self) -> str:
        if self.tail:
            return f"-{self.tail}"
        if self.end is None:
            return f"{self.start}-"
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


@dataclass(frozen=True)
class PageSpec:
    """A parsed page spec; no ranges means every page."""

    ranges: tuple[PageRange, ...] = ()

    @property
    def is_all(self) -> bool:
        return not self.ranges

    def __str__(self) -> str:
        return ",".join(map(str, self.ranges)) or "all"

    def resolve(self, n_pages: int) -> list[int]:
        """1-based page numbers in spec order, once each, clipped to `n_pages`; none left: `page_out_of_range`."""
        if not self.ranges:
            return list(range(1, n_pages + 1))
        pages: dict[int, None] = {}
        for r in self.ranges:
            if r.tail:
                first, last = max(n_pages - r.tail + 1, 1), n_pages
            else:
                first, last = r.start, n_pages if r.end is None else min(r.end, n_pages)
            pages.update(dict.fromkeys(range(first, last + 1)))
        if not pages:
            noun = "page" if n_pages == 1 else "pages"
            raise IdeficsError("page_out_of_range",
                               f"none of the chosen pages ({self}) is in the document (it has {n_pages} {noun})")
        return list(pages)


def parse_page_spec(spec: str | None) -> PageSpec:
    """Parse `--pages` text (see the module docstring); `None` or `all` selects every page."""
    if spec is None:
        return PageSpec()
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
        if m["tail"] is not None:
            r = PageRange(tail=int(m["tail"]))
            first = r.tail
        else:
            first = int(m["start"])
            end = int(m["end"]) if m["end"] is not None else (None if m["dash"] else first)
            r = PageRange(first, end)
        if first < 1:
            raise UsageError(f"bad page spec {spec!r}: pages are numbered from 1", hint=_HINT)
        if r.end is not None and r.end < r.start:
            raise UsageError(f"bad page spec {spec!r}: range {item!r} runs backwards", hint=_HINT)
        ranges.append(r)
    return PageSpec(tuple(ranges))
