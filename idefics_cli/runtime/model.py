"""The model stage: load a checkpoint of a supported family (families.py) and its processor into a `LocalEngine`.

`load_processor(options)` is the one processor loader; `start_load(options)` returns a `Loading` at once (weights in a
thread until `finish()`), `load_engine(options)` is both. Loaded as the model cards do (safetensors, no remote code,
sdpa, nf4 for "4bit"); failures are `IdeficsError`s with a hint. torch and transformers inside functions only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING

from .. import process
from ..ahead import in_thread
from ..errors import IdeficsError, is_oom
from ..hub import PULL_HINT, check_local_model, local_only, looks_local, source
from ..interface import DEFAULT_MODEL, ModelOptions, check_device  # noqa: F401 - DEFAULT_MODEL re-exported
from .engine import LocalEngine
from .families import chosen_quant, detect

if TYPE_CHECKING:
    from concurrent.futures import Future


def resolve_device(device: str) -> str:
    """The device to load on: `auto` resolved; UsageError for a value that is no device, model_error for CUDA
    asked without a GPU."""
    import torch

    check_device(device, "--device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IdeficsError("model_error", f"--device {device}: no CUDA GPU is available", "use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def import_bitsandbytes():
    """Import bitsandbytes quietly (unless IDEFICS_DEBUG=1) and off the hub: `kernels`, which its import asks for
    compiled code, is unimportable for the import alone; loggers and warning filters are restored; `torch.compile`
    is `_deferred` meanwhile. ImportError when it is not installed."""
    import logging
    import sys
    import warnings

    import torch

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"], compile_ = None, torch.compile
    torch.compile = _deferred(compile_)
    try:
        with warnings.catch_warnings():
            if not process.debug():
                warnings.filterwarnings("ignore", module="bitsandbytes")
                for logger in loggers:
                    logger.setLevel(logging.ERROR)
            import bitsandbytes
    finally:
        torch.compile = compile_
        if kernels is missing:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = kernels
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return bitsandbytes


def _deferred(compile_):
    """`compile_` (torch.compile) called at a function's first call, not as bitsandbytes' import hands it kernels."""

    def deferred(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(...)
            return functools.partial(deferred, **kwargs)
        compiled = functools.cache(lambda: compile_(fn, **kwargs))
        return functools.wraps(fn)(lambda *args, **kw: compiled()(*args, **kw))

    return deferred


def quantization_config(quant: str, dtype):
    from transformers import BitsAndBytesConfig

    if quant in ("4bit", "8bit"):
        import_bitsandbytes()
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def cache_miss(exc: BaseException, options: ModelOptions) -> bool:
    """Whether a load failed because a hub id's files are not cached and the hub was not asked (offline) or could not
    be reached; a local folder is never a cache miss, nor is any other failure offline."""
    if looks_local(options.model):
        return False
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = exc
    while seen is not None:  # transformers re-raises the hub's errors as OSError
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return "offline" in text.lower() or "connect" in text.lower() or "local_files_only" in text


def model_error(exc: BaseException, options: ModelOptions) -> IdeficsError:
    """The one-line `IdeficsError` of a failed load: out of memory, a cache miss, or what went wrong."""
    if is_oom(exc):
        return IdeficsError("out_of_memory", f"out of memory loading {options.model}", "try --quant 4bit")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if cache_miss(exc, options):
        why = "(offline)" if options.offline else "and the hub cannot be reached"
        return IdeficsError("model_error", f"{options.model} is not in the local cache {why}", PULL_HINT)
    if "safetensors" in text.lower():
        return IdeficsError("model_error", f"{options.model}: no safetensors weights (only safetensors are loaded)")
    if "is not a local folder" in text or "Repository Not Found" in text or "404" in text:
        return IdeficsError("model_error", f"model {options.model!r} was not found on the hub or on disk",
                            "check --model, or point it at a local copy")
    return IdeficsError("model_error", f"cannot load {options.model}: {text[:300]}")


def load_processor(options: ModelOptions, configure: bool = True, local_files_only: bool | None = None):
    """The processor alone. `configure`: apply `options.split` and left padding (False: as saved);
    `local_files_only`: the caller's `hub.local_only` decision, else made here."""
    if local_files_only is None:
        if looks_local(options.model) and not os.path.isdir(options.model):
            raise IdeficsError("model_error", f"model folder {options.model!r} does not exist")
        local_files_only = local_only(options, need="processor")  # not cached and no hub: fails here, at once
    process.quiet_loaded()
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source(options, local_files_only, need="processor"),
                                                  revision=options.revision, local_files_only=local_files_only,
                                                  trust_remote_code=False)
    except Exception as exc:  # OSError/ValueError from transformers and huggingface_hub
        raise model_error(exc, options) from exc
    if configure:
        if hasattr(processor.image_processor, "do_image_splitting"):
            processor.image_processor.do_image_splitting = options.split
        processor.tokenizer.padding_side = "left"
    return processor


def load_engine(options: ModelOptions) -> LocalEngine:
    """Load processor and model as the model card does, 4-bit by default."""
    return start_load(options).finish()


class Loading:
    """A load in progress: `processor` is here, the weights load in a thread until `finish()` returns the
    `LocalEngine` (or raises the load's `IdeficsError`)."""

    def __init__(self, options: ModelOptions, processor, device: str, dtype, weights: Future, start: float,
                 quant_reason: str, quant: str):
        self.options, self.processor, self.device, self.dtype = options, processor, device, dtype
        self._weights, self._start, self.quant_reason, self.quant = weights, start, quant_reason, quant

    def finish(self) -> LocalEngine:
        try:
            model = self._weights.result()
        except IdeficsError:
            raise
        except Exception as exc:  # OSError/ValueError from transformers and huggingface_hub
            raise model_error(exc, self.options) from exc
        finally:
            self._weights = None  # the Future lets go of the model (or its error)
        model.eval()
        return LocalEngine(self.processor, model, self.options, self.device, self.dtype,
                           time.perf_counter() - self._start, self.quant_reason, self.quant)


def expand_block_scales(model) -> None:
    """4-bit layers' 8-bit block scales (double quantization) expanded to float32 once, not by bitsandbytes per call."""
    import torch

    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and state.nested:
            state.absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
            ) + state.offset
            state.nested, state.state2, state.offset = False, None, None


@functools.cache
def _packed_linear():
    """A `torch.nn.Linear` that computes over oneDNN's prepacked copy of its weight (`packed`), made once."""
    import torch

    class PackedLinear(torch.nn.Linear):
        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    return PackedLinear


def pack_text_linears(model) -> None:
    """Float32 CPU: the language model's linear layers and its head compute over oneDNN's prepacked weights (as
    torch.compile's frozen CPU graphs do), the same up to float rounding. Each original weight is dropped unless the
    input embedding shares it: inference only. A torch without oneDNN (or the op) keeps the layers as they are."""
    import torch

    text = getattr(getattr(model, "model", None), "text_model", None)
    if text is None or not torch.backends.mkldnn.is_available():
        return
    shared = model.get_input_embeddings().weight
    cls = _packed_linear()
    for module in [*text.modules(), model.lm_head]:
        weight = getattr(module, "weight", None) if type(module) is torch.nn.Linear else None
        if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        try:  # laid out for products of a few rows (4)
            module.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
        except (AttributeError, RuntimeError):  # the op is missing: this layer and the rest stay as they are
            return
        module.__class__ = cls
        if weight is not shared:
            module.weight = None


def check_model(options: ModelOptions) -> dict:
    """What a load checks before any weight is read (the device's name, a local folder, the family): its config.json,
    or the UsageError / model_error a load would raise."""
    check_device(options.device, "--device")
    if looks_local(options.model):
        check_local_model(options.model)
    try:
        return detect(options, local_only(options))[1]
    except (OSError, ValueError) as exc:
        raise model_error(exc, options) from exc


def start_load(options: ModelOptions, cpu_kernels: bool = True) -> Loading:
    """Start loading: the checks, the weights' thread, then the processor in this thread. `cpu_kernels`: on the CPU,
    `expand_block_scales` and `pack_text_linears` (off to save or train the weights as loaded)."""
    start = time.perf_counter()
    config = check_model(options)
    common = {"revision": options.revision, "local_files_only": local_only(options), "trust_remote_code": False}
    process.quiet_loaded()
    loaded, quant_reason = chosen_quant(options.quant, config)  # a checkpoint saved quantized: as saved
    if options.quant == "auto":  # resolved in the options (what the library's transcribe hashes); else as asked
        options = dataclasses.replace(options, quant=loaded)
    from concurrent.futures import wait

    import torch
    from transformers import AutoModelForImageTextToText

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    process.tune_allocators()  # opted-in processes (the commands): big buffers reused (process.tune)
    kwargs = {"dtype": dtype, "use_safetensors": True, "attn_implementation": "sdpa", **common,
              "device_map": {"": device if device != "cuda" else f"cuda:{torch.cuda.current_device()}"}}
    try:
        quant = quantization_config(loaded, dtype)
    except Exception as exc:  # bitsandbytes missing, or transformers' OSError/ValueError
        raise model_error(exc, options) from exc
    if quant is not None:
        if not device.startswith("cuda") and loaded == "8bit":
            raise IdeficsError("model_error", "--quant 8bit needs a CUDA GPU", "use --quant 4bit or none")
        kwargs["quantization_config"] = quant
    # In a short-lived thread: its idle OpenMP workers end with it instead of slowing the generating thread
    def load():
        model = AutoModelForImageTextToText.from_pretrained(source(options, common["local_files_only"]), **kwargs)
        if cpu_kernels and not device.startswith("cuda"):
            expand_block_scales(model)
            pack_text_linears(model)
        return model

    weights = in_thread(load, name="idefics-load")
    try:
        processor = load_processor(options, local_files_only=common["local_files_only"])
    except BaseException as exc:
        wait([weights])
        if isinstance(exc, Exception) and not isinstance(exc, IdeficsError):
            raise model_error(exc, options) from exc
        raise
    return Loading(options, processor, device, dtype, weights, start, quant_reason, loaded)
