"""Records: the typed results that leave the program (docs/formats.md).

Contract: `Answer` is what `ask --json` prints (schema `idefics-cli.answer/1`); `PageRecord` is one line of
`transcribe` output (schema `idefics-cli.page/1`). Both are plain dataclasses whose `to_dict()` gives
exactly the documented JSON fields (`warnings`: codes of errors.WARNINGS, empty when all is well);
`settings_hash()` is the short hash of everything that changes a page's text, used by resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

ANSWER_SCHEMA = "idefics-cli.answer/1"
PAGE_SCHEMA = "idefics-cli.page/1"


@dataclass
class Source:
    path: str
    pages: list[int]


@dataclass
class Answer:
    question: str
    answer: str
    finish_reason: str
    sources: list[Source]
    split: bool
    model: dict
    usage: dict
    timing: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": ANSWER_SCHEMA, **asdict(self)}


@dataclass
class PageRecord:
    path: str
    page: int
    pages: int
    status: str
    sha256: str
    settings: str
    text: str | None = None
    error: dict | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema": PAGE_SCHEMA, "path": d.pop("path"), "page": d.pop("page"), "pages": d.pop("pages"),
                "status": d.pop("status"), "text": d.pop("text"), "error": d.pop("error"),
                "finish_reason": d.pop("finish_reason"), "warnings": d.pop("warnings"), **d}

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.sha256, self.page, self.settings)


def settings_hash(**settings) -> str:
    """Short, stable hash of the settings that change a page's text (model, quant, split, size, prompt...)."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
