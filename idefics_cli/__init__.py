"""idefics-cli: ask documents questions and transcribe them with Idefics2-8B, locally, 4-bit.

Contract: the library face. `load(model, **options)` loads the model once and returns a `Model` (library.py)
whose `ask(documents, question, pages=...)` returns a streaming `Response` (response.py): iterate it for the
text pieces; `.text`, `.finish_reason`, `.usage` and `.to_dict()` (the `idefics ask --json` object) once it
is read; `transcribe(...)` and `chat(...)` as the commands. `open_pages(...)` decodes the chosen pages ahead
of loading, as the CLI does. `connect(url, api_key=None)` is the `Model` of a running `idefics serve`, used
the same way, with no torch in this process.
The keywords of `load` are the CLI's model options, with the same defaults. The library leaves the process's
warning filters, log levels, environment and allocators as they are; `tune_process()` (or `load(...,
tune_process=True)`) opts in to the commands' settings (process.py). Importing this package imports neither
torch nor transformers: they load with the model.
"""

from __future__ import annotations

from .interface import DEFAULT_MODEL, ModelOptions
from .library import Model
from .process import tune_process

_tune_process = tune_process  # `load`'s keyword of the same name hides it

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "Model", "connect", "load", "open_pages", "tune_process"]

_DEFAULTS = ModelOptions()  # one set of defaults: the CLI's options and this function's keywords


def load(model: str = DEFAULT_MODEL, *, revision: str | None = _DEFAULTS.revision, quant: str = _DEFAULTS.quant,
         dtype: str = _DEFAULTS.dtype, device: str = _DEFAULTS.device, offline: bool = _DEFAULTS.offline,
         split: bool = _DEFAULTS.split, max_new_tokens: int = _DEFAULTS.max_new_tokens,
         tune_process: bool = False) -> Model:
    """Load the processor and the model (a hub id or a local folder) and return its `Model`.

    quant: "auto" (4bit from 4B parameters, else none), "4bit" (bitsandbytes nf4 + double quant), "8bit" (CUDA
    only) or "none"; dtype: "auto", "bfloat16",
    "float16" or "float32"; device: "auto", "cpu", "cuda" or "cuda:N"; offline: never touch the network;
    split: image splitting (4 crops + the whole page); max_new_tokens: the default length of an answer;
    tune_process: first opt the process in to the commands' settings (quiet libraries, tuned allocators:
    `idefics_cli.tune_process()`), which a program otherwise keeps as they are.
    Raises `IdeficsError("model_error" | "out_of_memory")` with a hint when the model cannot be loaded.
    """
    from .errors import UsageError
    from .runtime.model import load_engine as load_model

    if quant not in ("auto", "4bit", "8bit", "none"):
        raise UsageError(f"quant {quant!r}: use auto, 4bit, 8bit or none")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    if tune_process:
        _tune_process()
    return Model(load_model(ModelOptions(model=model, revision=revision, quant=quant, dtype=dtype, device=device,
                                         offline=offline, split=split, max_new_tokens=max_new_tokens)))


def open_pages(documents, pages: str | None = None, *, password: str | None = None, dpi: int | None = None):
    """Open documents and decode their chosen pages now (no model needed); give the result to `Model.ask`."""
    from .tasks.selection import open_selection

    return open_selection(documents, pages, password=password, dpi=dpi)


def connect(url: str, *, api_key: str | None = None, max_new_tokens: int = _DEFAULTS.max_new_tokens):
    """The model of a running `idefics serve` at `url`, used like a loaded engine (`ask`, `transcribe`, chat).

    Pages are rendered here, as `idefics ask --server` does, and answered by the server. Raises
    `IdeficsError("model_error")` naming the URL when the server cannot be reached or refuses the key.
    """
    from .remote.client import RemoteEngine

    return Model(RemoteEngine(url, api_key, max_new_tokens))
