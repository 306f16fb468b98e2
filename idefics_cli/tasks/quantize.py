"""Save a model quantized to 4-bit once, so later loads are fast and small: the library behind `idefics quantize`.

Contract: `save_4bit(options, out_dir, status)` loads the model as `--quant 4bit` does and saves it with its
processor into `out_dir` (empty or missing, else `UsageError`), written under a temporary name beside it and renamed
(an unwritable place: `output_error` before the model loads; an already quantized model: `UsageError`, unloaded);
a failure leaves no folder it made.
Returns `Quantized`; `status(message)` wraps each long step. torch and transformers are imported inside functions
only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace

from ..errors import IdeficsError, UsageError
from .doctor import model_files
from .writers import follow_umask, umask


@dataclass(frozen=True)
class Quantized:
    out_dir: str
    before_bytes: int | None
    after_bytes: int
    dtype: str


def weights_bytes(folder: str) -> int:
    """Total size of the .safetensors files in a folder (HF cache symlinks followed)."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))


def save_4bit(options, out_dir: str, status=lambda message: contextlib.nullcontext()) -> Quantized:
    """Load `options.model` in 4-bit and save it with its processor into the new folder `out_dir`."""
    from ..runtime.model import load_processor, start_load

    options = replace(options, quant="4bit")  # whatever the model's size (--quant auto would not)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    real = os.path.realpath(out_dir)  # a symlink's target: renamed onto, the link is kept
    if os.path.exists(real) and (not os.path.isdir(real) or os.listdir(real)):
        raise UsageError(f"{out_dir} exists and is not an empty folder", "choose a new folder")
    parent, tmp, made = os.path.dirname(real), None, []
    folder = parent
    while not os.path.lexists(folder):  # the folders makedirs makes, deepest first: removed if it fails
        made.append(folder)
        folder = os.path.dirname(folder)
    try:  # the temporary folder is made first, so an unwritable OUT_DIR fails before the model loads
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".idefics-quantize-", dir=parent)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the model folder should not be
        found = model_files(options.model, options.revision)
        if found["pre_quantized"]:  # transformers cannot save a loaded quantized checkpoint again
            raise UsageError(f"{options.model} is already quantized ({found['pre_quantized']})",
                             "use it as it is: --model " + options.model)
        with status(f"Loading {options.model} in 4-bit…"):
            engine = start_load(options, cpu_kernels=False).finish()  # saved as loaded: double-quantized
        cfg = getattr(engine.model.config, "quantization_config", None)
        if cfg is None or not getattr(cfg, "load_in_4bit", False):
            raise IdeficsError("model_error", f"{options.model} did not load as a 4-bit model")
        source = found["path"]
        before = weights_bytes(source) if source and os.path.isdir(source) else None
        with status(f"Saving to {out_dir}…"):
            try:
                engine.model.save_pretrained(tmp)
            except Exception as exc:
                if type(exc).__name__ != "SafetensorError":  # safetensors' own error for a failed write (full disk)
                    raise
                raise OSError(str(exc).splitlines()[0]) from exc
            load_processor(options, configure=False).save_pretrained(tmp)
            follow_umask(tmp)  # transformers writes the weights 0600
        if os.path.isdir(real):
            os.rmdir(real)  # empty, checked above
        os.rename(tmp, real)
    except OSError as exc:
        raise IdeficsError("output_error", f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made if not os.path.isdir(real) else []:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return Quantized(out_dir, before, weights_bytes(out_dir), engine.info["dtype"])
