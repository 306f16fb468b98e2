"""Records: the page records that `transcribe` writes (docs/formats.md).

Contract: `PageRecord.to_dict()` gives exactly the documented fields, `from_dict` reads one back; every page record
comes from a factory here (`ok_record`, `blank_record`, `error_record`), whichever engine runs. `Summary` counts a
run's records; `settings_hash()` hashes what changes a page's text (the resume key). `to_markdown(doctags)` is a
document model's answer as Markdown (None without docling-core, the `[docling]` extra; imported lazily).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from ..errors import ExitStatus, IdeficsError
from . import confidence

DOCTAGS_HINT = ("the model answers in DocTags; pip install 'idefics-cli[docling]' (docling-core) to add \"markdown\" "
                "to each record and write Markdown to the .md files, which hold the DocTags meanwhile")
NO_DATA = "<no data>"  # PageRecord.data of a run without --schema: no "data" field is written (compared by identity)
PAGE_SCHEMA = "idefics-cli.page/1"


@dataclass
class Source:
    path: str
    pages: list[int]


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
    data: object = NO_DATA  # with --schema: the parsed answer or None; NO_DATA: a run without a schema
    confidence: dict | None = None
    field_confidence: object = None  # with --schema (written with `data`)
    markdown: str | None = None  # a document model's DocTags `text` as Markdown (docling-core); None: no field

    def to_dict(self) -> dict:
        d = asdict(self)
        out = {"schema": PAGE_SCHEMA, **{k: d.pop(k) for k in ("path", "page", "pages", "status", "text")}}
        data, fields_, markdown = d.pop("data"), d.pop("field_confidence"), d.pop("markdown")
        out.update({"markdown": markdown} if markdown is not None else {})
        out.update({"data": data, "field_confidence": fields_} if self.data is not NO_DATA else {})
        return {**out, **{k: d.pop(k) for k in ("error", "finish_reason", "confidence", "warnings")}, **d}

    @classmethod
    def from_dict(cls, record: dict) -> PageRecord:
        """The record a `to_dict()` gave (a line of a records file, or a row that crossed a process)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def ok_record(task, gen, preprocess_s: float, settings: str, batch_size: int = 1,
              schema=None, min_confidence: float | None = None, doctags: bool = False,
              max_new_tokens: int | None = None) -> PageRecord:
    """The record of a page (batch.PageTask) answered by `gen`, timed as its share of its batch's call. With a
    `schema`, `data` or an error record keeping the text (naming `max_new_tokens` when cut); below `min_confidence`
    a `low_confidence` warning; `doctags`: the text is DocTags, given as Markdown too."""
    data, error, fields_, warnings = NO_DATA, None, None, list(task.warnings)
    summary = confidence.summary(gen.logprobs, gen.ends)
    if schema is not None:
        from .. import structured  # only with a schema: no schema machinery otherwise

        data, code = structured.read_answer(gen.text, schema, gen.finish_reason)
        if code is not None:
            error = structured.answer_error(code, max_new_tokens).to_dict()
        elif data is not None:  # null data: null field_confidence, as an answer's (formats.md)
            fields_ = confidence.fields(gen.text, gen.logprobs, gen.ends)
    low = confidence.lowest(fields_)
    low = (summary or {}).get("min_prob") if low is None else low
    if min_confidence is not None and error is None and low is not None and low < min_confidence:
        warnings.append("low_confidence")
    return PageRecord(path=task.input.path, page=task.page, pages=task.pages, status="error" if error else "ok",
                      sha256=task.sha256, settings=settings, text=gen.text, error=error,
                      finish_reason=gen.finish_reason,
                      usage={**gen.prompt_usage, "completion_tokens": gen.completion_tokens},
                      timing={"preprocess_s": round(preprocess_s, 4), "generate_s": round(gen.total_s / batch_size, 4),
                              "batch_size": batch_size}, warnings=warnings, data=data, confidence=summary,
                      field_confidence=fields_, markdown=to_markdown(gen.text) if doctags and not error else None)


def blank_record(task, settings: str, schema=None) -> PageRecord:
    """A flat-colour page: "" without asking the model (with a schema, `"data": null`)."""
    return PageRecord(path=task.input.path, page=task.page, pages=task.pages, status="ok", sha256=task.sha256,
                      settings=settings, text="", finish_reason="stop", warnings=list(task.warnings),
                      usage={"prompt_tokens": 0, "image_tokens": 0, "completion_tokens": 0},
                      timing={"preprocess_s": 0.0, "generate_s": 0.0, "batch_size": 0},
                      data=NO_DATA if schema is None else None)


def error_record(path: str, error: IdeficsError | dict, settings: str, page: int = 0, pages: int = 0,
                 sha256: str = "", warnings=()) -> PageRecord:
    """A page (or a whole document, page 0) that failed: its error code and message, no text."""
    error = error.to_dict() if isinstance(error, IdeficsError) else dict(error)
    return PageRecord(path=path, page=page, pages=pages, status="error", sha256=sha256, settings=settings,
                      error=error, warnings=list(warnings))


def task_error(task, error: IdeficsError, settings: str) -> PageRecord:
    """`error_record` for a page task (batch.PageTask) that failed in the model or its preprocessing."""
    return error_record(task.input.path, error, settings, task.page, task.pages, task.sha256, task.warnings)


@dataclass
class Summary:
    """What a run did: pages done, already done, failed, and how long it took; `add` counts one record."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    not_documents: int = 0  # files a folder or glob held that are not supported documents: skipped, not failed
    low_confidence: int = 0  # ok pages warned `low_confidence`

    def add(self, record: PageRecord) -> None:
        if record.status == "ok":
            self.ok += 1
            self.low_confidence += "low_confidence" in record.warnings
        else:
            self.failed += 1
            line = f"{record.path} page {record.page}: {record.error['code']}"
            self.failures.append(line.replace("\n", " "))  # one line each, as errors.py's

    @property
    def exit_status(self) -> ExitStatus:
        if not self.failed:
            return ExitStatus.OK
        return ExitStatus.PARTIAL if self.ok + self.skipped else ExitStatus.INPUT

    def failure_lines(self, records: str | None, limit: int = 20) -> list[str]:
        """One line per failed page; past `limit` (unless `records` is None), one more says where the rest are."""
        shown = self.failures if records is None or len(self.failures) <= limit else self.failures[:limit]
        lines = [f"  failed: {failure}" for failure in shown]
        if len(shown) < len(self.failures):
            lines.append(f"  and {len(self.failures) - len(shown)} more (see {records})")
        return lines

    def line(self) -> str:
        rate = self.ok / self.seconds if self.seconds else 0.0
        skipped = f", {self.not_documents} files skipped (not documents)" if self.not_documents else ""
        low = f" ({self.low_confidence} low confidence)" if self.low_confidence else ""
        return (f"{self.ok} pages transcribed{low}, {self.skipped} already done, {self.failed} failed{skipped} "
                f"in {self.seconds:.1f}s ({rate:.2f} pages/s)")


def trusted(record: dict) -> bool:
    """Whether a record read back from a records file (edited by hand, it may hold anything) is one resume and the
    .md files can use: path, sha256 and settings strings, a page number, an ok page's text or an error's code and
    message."""
    if not all(isinstance(record.get(k), str) for k in ("path", "sha256", "settings")) or type(
            record.get("page")) is not int:
        return False
    if record.get("status") == "ok":
        return isinstance(record.get("text"), str) and isinstance(record.get("markdown"), (str, type(None)))
    error = record.get("error")
    return isinstance(error, dict) and all(isinstance(error.get(k), str) for k in ("code", "message"))


def settings_hash(**settings) -> str:
    """Short, stable hash of the settings that change a page's text (model, quant, split, size, prompt...)."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def docling_available() -> bool:
    from ..extras import _importable

    return _importable("docling_core")


def to_markdown(doctags: str) -> str | None:
    """One page's DocTags as Markdown (what docling-core could read of it, possibly ""); None without docling-core."""
    if not docling_available():  # first: with the extra hidden (sys.modules) its submodules may still import
        return None
    try:
        from docling_core.types.doc.document import DoclingDocument, DocTagsDocument
    except ImportError:
        return None
    pages = DocTagsDocument.from_doctags_and_image_pairs([doctags], [None])
    return DoclingDocument.load_from_doctags(pages, document_name="page").export_to_markdown()
