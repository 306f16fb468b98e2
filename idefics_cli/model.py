"""The model stage: load Idefics2 and its processor.

Contract:
- `ModelOptions` carries every model setting, `offline` included: offline is an option like any other, passed
  on as `local_files_only=` (nothing here reads or writes the process environment's offline variables).
- `load_processor(options)` is the one processor loader (`load`, `crops` and `quantize` use it): the same
  local-folder check and offline/cache decision (`hub.local_only(options, need="processor")`; a cached hub
  id is read from its snapshot folder, `hub.source`), the same errors, and the runtime settings
  (`do_image_splitting` from `options.split`, left padding) unless `configure=False` asks for the
  processor exactly as saved. `load` reads the weights from the same place (`hub.source`).
- Loading tunes the process's allocators for the engine's big short-lived buffers (allocator.py).
- `start_load(options)` starts a load and returns at once with the processor (`Loading`: the weights load in a
  thread until `finish()` gives the `Engine`), so inputs can be prepared meanwhile; `load(options)` is both.
- `load(options)` returns an `Engine` (engine.py) holding the processor and the model, loaded the way the
  idefics2-8b model card does it (AutoProcessor + Idefics2ForConditionalGeneration, safetensors only,
  never remote code, sdpa attention, bitsandbytes nf4 + double quant for `quant="4bit"`). Failures raise
  `IdeficsError("model_error" | "out_of_memory", ...)` with a hint.
torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import os
import threading
import time

from . import allocator
from .engine import Engine
from .errors import IdeficsError, is_oom
from .hub import PULL_HINT, check_local_model, local_only, looks_local, source
from .interface import DEFAULT_MODEL, ModelOptions  # noqa: F401 - re-exported: the loader's options


def quiet_libraries() -> None:
    """Send transformers/bitsandbytes chatter away from stdout (errors only, no progress bars), and keep
    bitsandbytes' import-time log lines ("Failed to load CPU gemm_4bit_forward from kernels-community") off
    stderr unless IDEFICS_DEBUG=1."""
    import logging
    import warnings

    if not os.environ.get("IDEFICS_DEBUG"):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("kernels").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_device(device: str) -> str:
    import torch

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
    """Import bitsandbytes without letting it reach the hub: on a CPU with AVX512-BF16 its CPU backend asks the hub
    (kernels-community) for a compiled kernel while it is imported, a connection and code fetched at run time that
    `--offline` and the hub's own offline switch would not otherwise stop. The import runs with huggingface_hub's
    offline flag set, so that lookup stays local and, finding nothing cached, bitsandbytes keeps its own CPU code
    (what ran before transformers 5.25 brought in the `kernels` package). ImportError when it is not installed."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    quiet_libraries()
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        import bitsandbytes
    finally:
        constants.HF_HUB_OFFLINE = saved
    return bitsandbytes


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


def model_error(exc: BaseException, options: ModelOptions) -> IdeficsError:
    if is_oom(exc):
        return IdeficsError("out_of_memory", f"out of memory loading {options.model}", "try --quant 4bit")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if options.offline or "offline" in text.lower() or "connect" in text.lower() or "local_files_only" in text:
        why = "(offline)" if options.offline else "and the hub cannot be reached"
        return IdeficsError("model_error", f"{options.model} is not in the local cache {why}", PULL_HINT)
    if "safetensors" in text.lower():
        return IdeficsError("model_error", f"{options.model}: no safetensors weights (only safetensors are loaded)")
    if "is not a local folder" in text or "Repository Not Found" in text or "404" in text:
        return IdeficsError("model_error", f"model {options.model!r} was not found on the hub or on disk",
                            "check --model, or point it at a local copy")
    return IdeficsError("model_error", f"cannot load {options.model}: {text[:300]}")


def load_processor(options: ModelOptions, configure: bool = True, local_files_only: bool | None = None):
    """The processor alone (no weights). `configure`: apply `options.split` and left padding (False: as saved).
    `local_files_only`: the caller's own `hub.local_only` decision, else made here for the processor's files."""
    if local_files_only is None:
        if looks_local(options.model) and not os.path.isdir(options.model):
            raise IdeficsError("model_error", f"model folder {options.model!r} does not exist")
        local_files_only = local_only(options, need="processor")  # not cached and no hub: fails here, at once
    quiet_libraries()
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


def load(options: ModelOptions) -> Engine:
    """Load processor and model as the model card does, 4-bit by default."""
    return start_load(options).finish()


class Loading:
    """A load in progress: the processor is here (`processor`, on `device`), the weights load in a thread until
    `finish()` returns the `Engine` (or raises the load's `IdeficsError`)."""

    def __init__(self, options: ModelOptions, processor, device: str, dtype, loader, loaded: dict, start: float):
        self.options, self.processor, self.device, self.dtype = options, processor, device, dtype
        self._loader, self._loaded, self._start = loader, loaded, start

    def finish(self) -> Engine:
        self._loader.join()
        loaded, self._loaded = self._loaded, {}
        if "error" in loaded:
            exc = loaded["error"]
            if isinstance(exc, IdeficsError) or not isinstance(exc, Exception):
                raise exc
            raise model_error(exc, self.options) from exc
        model = loaded["model"]
        model.eval()
        return Engine(self.processor, model, self.options, self.device, self.dtype, time.perf_counter() - self._start)


def start_load(options: ModelOptions) -> Loading:
    """Start loading: the checks, the weights' thread, then the processor in this thread (what `load` waits for)."""
    start = time.perf_counter()
    if looks_local(options.model):
        check_local_model(options.model)
    common = {"revision": options.revision, "local_files_only": local_only(options), "trust_remote_code": False}
    quiet_libraries()
    import torch
    from transformers import Idefics2ForConditionalGeneration

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    allocator.tune()  # big buffers reused rather than faulted in afresh (allocator.py)
    try:
        kwargs = {"dtype": dtype, "use_safetensors": True, "attn_implementation": "sdpa", **common}
        quant = quantization_config(options.quant, dtype)
        if quant is not None:
            if not device.startswith("cuda") and options.quant == "8bit":
                raise IdeficsError("model_error", "--quant 8bit needs a CUDA GPU", "use --quant 4bit or none")
            kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device if device != "cuda" else f"cuda:{torch.cuda.current_device()}"}
    except IdeficsError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError for these
        raise model_error(exc, options) from exc
    # The weights load in a short-lived thread while this one loads the processor. Its OpenMP workers end
    # with it: a thread that keeps idle OpenMP workers makes libgomp throttle those of the thread that
    # generates (4-bit matmuls on the CPU ran 1.4x slower in a streaming `ask`; bench/ask.py).
    loaded: dict = {}

    def load_weights():
        try:
            loaded["model"] = Idefics2ForConditionalGeneration.from_pretrained(
                source(options, common["local_files_only"]), **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the thread that finishes the load
            loaded["error"] = exc

    loader = threading.Thread(target=load_weights, name="idefics-load", daemon=True)
    loader.start()
    try:
        processor = load_processor(options, local_files_only=common["local_files_only"])
    except IdeficsError:
        loader.join()
        raise
    except Exception as exc:
        loader.join()
        raise model_error(exc, options) from exc
    except BaseException:
        loader.join()
        raise
    return Loading(options, processor, device, dtype, loader, loaded, start)
