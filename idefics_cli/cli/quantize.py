"""`idefics quantize OUT_DIR`: load the model in 4-bit once and save it, so later loads are fast and small.

Contract: parsing and printing over the library's `quantize.save_4bit` (docs/quantize.md). OUT_DIR goes to
stdout; sizes to stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o

EXAMPLES = """
  idefics quantize ~/models/idefics2-8b-nf4
  idefics quantize ./chatty-nf4 --model HuggingFaceM4/idefics2-8b-chatty
  idefics ask --model ~/models/idefics2-8b-nf4 --offline doc.pdf "What is the total?"
  idefics quantize ./nf4 --device cpu --dtype bfloat16   # prepare on a CPU box, run on a GPU
"""


@o.model_params(1, only=("model", "revision", "dtype", "device", "offline"))
@o.runs
def quantize_command(
    out,
    out_dir: Annotated[str, typer.Argument(metavar="OUT_DIR", show_default=False,
                                           help="New folder for the 4-bit model (must be empty or missing).")],
    opts: o.ModelOptions = None,
) -> int:
    """Save a 4-bit (nf4) copy of the model with its processor. Later loads are small and fast."""
    from ..tasks.doctor import human_bytes
    from ..tasks.quantize import save_4bit

    done = save_4bit(opts, out_dir, status=out.status)
    ratio = f" ({done.after_bytes / done.before_bytes:.0%} of the original)" if done.before_bytes else ""
    out.console.print(f"weights: {human_bytes(done.before_bytes)} -> {human_bytes(done.after_bytes)}{ratio}; nf4, "
                      f"compute dtype {done.dtype}", markup=False, highlight=False)
    out.write(done.out_dir + "\n")
    return 0
