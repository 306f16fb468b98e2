"""`idefics quantize OUT_DIR`: load the model in 4-bit once and save it, so later loads are fast and small.

Contract: the model is loaded exactly as `--quant 4bit` loads it (bitsandbytes nf4, double quant, compute
in the chosen dtype) and written to OUT_DIR with `save_pretrained` (safetensors, bitsandbytes 4-bit
serialization; config.json carries the `quantization_config`), together with the original processor
files (loaded fresh, so no runtime setting leaks in) and the generation config. `--model OUT_DIR` then
loads `Linear4bit` layers straight from disk without quantizing again, and answers exactly as `--quant
4bit` on the original. OUT_DIR must be empty or missing; it is written under a temporary name and renamed
into place, so a crash never leaves a half-written model. OUT_DIR goes to stdout; sizes to stderr.
The dtype is saved with the weights (compute dtype and unquantized layers) and wins over `--dtype` at load
time, so quantize with the dtype you will run in (`--dtype bfloat16` for a GPU, even when quantizing on a CPU).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from . import options as o

EPILOG = """Examples:

\b
  idefics quantize ~/models/idefics2-8b-nf4
  idefics quantize ./chatty-nf4 --model HuggingFaceM4/idefics2-8b-chatty
  idefics ask --model ~/models/idefics2-8b-nf4 --offline doc.pdf "What is the total?"
  idefics quantize ./nf4 --device cpu --dtype bfloat16   # prepare on a CPU box, run on a GPU
"""


def quantize(
    out_dir: Annotated[str, typer.Argument(metavar="OUT_DIR", show_default=False,
                                           help="New folder for the 4-bit model (must be empty or missing).")],
    model: o.Model = o.DEFAULT_MODEL,
    revision: o.Revision = None,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.Device = "auto",
    offline: o.Offline = False,
) -> None:
    """Load the model in 4-bit (nf4) and save it with its processor, for fast, small loads."""
    from ..output import Output

    out = Output()
    opts = o.model_options(model, revision, o.Quant.bit4, dtype, device, offline, True, 1)
    o.run_and_exit(lambda: _quantize(out, opts, out_dir), out)


def weights_bytes(folder: str) -> int:
    """Total size of the .safetensors files in a folder (HF cache symlinks followed)."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))


def _source_folder(opts) -> str | None:
    from ..diagnostics import model_files

    return model_files(opts.model, opts.revision)["path"]


def _quantize(out, opts, out_dir: str) -> int:
    import shutil
    import tempfile

    from ..diagnostics import human_bytes
    from ..errors import IdeficsError, UsageError
    from ..hub import local_only
    from ..model import load
    from ..writers import follow_umask, umask

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UsageError(f"{out_dir} exists and is not an empty folder", "choose a new folder")
    parent = os.path.dirname(out_dir)
    try:  # the temporary folder is made first, so an unwritable OUT_DIR fails before the model loads
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".idefics-quantize-", dir=parent)
    except OSError as exc:
        raise IdeficsError("output_error", f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the model folder should not be
        with out.status(f"Loading {opts.model} in 4-bit…"):
            engine = load(opts)
        cfg = getattr(engine.model.config, "quantization_config", None)
        if cfg is None or not getattr(cfg, "load_in_4bit", False):
            raise IdeficsError("model_error", f"{opts.model} did not load as a 4-bit model")
        source = _source_folder(opts)
        before = weights_bytes(source) if source and os.path.isdir(source) else None

        from transformers import AutoProcessor

        with out.status(f"Saving to {out_dir}…"):
            engine.model.save_pretrained(tmp)
            AutoProcessor.from_pretrained(opts.model, revision=opts.revision,
                                          local_files_only=local_only(opts, need="processor"),
                                          trust_remote_code=False).save_pretrained(tmp)
            follow_umask(tmp)  # transformers writes the weights 0600
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.rename(tmp, out_dir)
    except OSError as exc:
        raise IdeficsError("output_error", f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    after = weights_bytes(out_dir)
    ratio = f" ({after / before:.0%} of the original)" if before else ""
    out.console.print(f"weights: {human_bytes(before)} -> {human_bytes(after)}{ratio}; nf4, compute dtype "
                      f"{engine.info['dtype']}", markup=False, highlight=False)
    out.write(out_dir + "\n")
    return 0
