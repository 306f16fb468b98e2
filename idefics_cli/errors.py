"""Errors and exit statuses: one table from failure to code to exit status.

Every failure a user can cause raises `IdeficsError(code, message, hint=...)` with a documented code (docs/formats.md)
or `usage`/`internal`; `EXIT_FOR_CODE` maps it to its exit status. `classify()` turns any exception into an
`IdeficsError` (recorded per page); `WARNINGS` names a read page's warning codes. Nothing here imports torch.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    PARTIAL = 3
    INPUT = 4
    MODEL = 5
    INTERRUPTED = 130


INPUT_CODES = ("not_found", "permission_denied", "unsupported_format", "corrupt", "encrypted", "wrong_password",
               "empty_document", "page_out_of_range", "image_too_large")
# schema_truncated / schema_mismatch (structured.py): like generation_error, the model did not deliver
MODEL_CODES = ("model_error", "out_of_memory", "generation_error", "schema_truncated", "schema_mismatch")

EXIT_FOR_CODE: dict[str, ExitStatus] = {
    **{code: ExitStatus.INPUT for code in INPUT_CODES},
    **{code: ExitStatus.MODEL for code in MODEL_CODES},
    "usage": ExitStatus.USAGE,
    "output_error": ExitStatus.INPUT,
    "interrupted": ExitStatus.INTERRUPTED,
    "internal": ExitStatus.INTERNAL,
}


# Warning codes: the page was read, but what the model sees may not be what the user expects.
WARNINGS = {
    "blank_page": "the page is one flat colour: there is nothing to read on it",
    "xfa_form": "the PDF is an XFA form: what renders may be only its placeholder (\"Please wait...\")",
    "repaired": "the file is damaged and was repaired to be read: pages may be missing or wrong",
    "downscaled": "the page is too large for the pixel budget and was rendered smaller than asked",
    "first_frame_only": "the image is animated: only its first frame is read",
    "low_confidence": "the model was unsure of part of this answer (under --min-confidence): check it by hand",
}


def warning_line(code: str, path: str | None = None, page: int | None = None) -> str:
    """One line for stderr: `path page N: code (what it means)`."""
    where = f"{path} page {page}: " if path and page else f"{path}: " if path else ""
    return f"{where}{code} ({WARNINGS.get(code, code)})".replace("\n", " ")


class IdeficsError(Exception):
    """A failure with a documented code, a one-line message and an optional hint."""

    def __init__(self, code: str, message: str, hint: str | None = None, path: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint, self.path = code, message, hint, path

    @property
    def exit_status(self) -> ExitStatus:
        return EXIT_FOR_CODE.get(self.code, ExitStatus.INTERNAL)

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"error [{self.code}]: {where}{self.message}{hint}".replace("\n", " ")

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}

    def __reduce__(self):  # pickled whole, subclasses too: a Ray actor's error reaches the driver as raised
        return _rebuilt, (type(self), self.__dict__)


def _rebuilt(cls, state: dict) -> IdeficsError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message"))
    err.__dict__.update(state)
    return err


class UsageError(IdeficsError):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__("usage", message, hint)


class StalledAnswer(IdeficsError):
    """A `model_error` of one answer only: a server's stream that sent nothing for too long (remote/transport.py).
    transcribe records its page and chat its turn, and both go on, where another model_error ends them."""


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors, without importing torch."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def classify(exc: BaseException, path: str | None = None, stage: str = "generate") -> IdeficsError:
    """Map any exception to an IdeficsError (used to record a failed page and go on)."""
    if isinstance(exc, IdeficsError):
        if path and not exc.path:
            exc.path = path
        return exc
    if is_oom(exc):
        hint = "try --no-split, --batch-size 1 or --quant 4bit"
        return IdeficsError("out_of_memory", "ran out of memory", hint, path)
    if isinstance(exc, FileNotFoundError):
        return IdeficsError("not_found", "no such file", path=path)
    if isinstance(exc, PermissionError):
        return IdeficsError("permission_denied", "permission denied", path=path)
    code = "generation_error" if stage == "generate" else "corrupt"
    return IdeficsError(code, f"{type(exc).__name__}: {exc}".splitlines()[0][:300], path=path)
