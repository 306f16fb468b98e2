"""Whether a setup can run the model, and if not why not: the checks behind `idefics doctor`.

Contract: `diagnose(options)` runs every check and returns one JSON-ready report (schema `SCHEMA`; `ok` and
`reason` hold the verdict); a hub model not cached while offline or without the hub raises `model_error` first.
The network is touched only to fetch the config files of a model not cached yet. The memory estimate counts
parameters on the meta device and reads image counts from the processor's configs. Heavy imports are lazy.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time

SCHEMA = "idefics-cli.doctor/1"
GIB = 2**30


PACKAGES = {"torch": "torch", "transformers": "transformers", "bitsandbytes": "bitsandbytes",
            "accelerate": "accelerate", "pymupdf": "PyMuPDF", "pillow": "pillow", "huggingface_hub": "huggingface_hub",
            "llguidance": "llguidance", "jsonschema": "jsonschema", "idefics_cli": "idefics-cli"}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        found[key] = None
        with contextlib.suppress(PackageNotFoundError):
            found[key] = version(dist)
    return found


def cuda_info() -> dict:
    import torch

    info = {"available": bool(torch.cuda.is_available()), "version": torch.version.cuda, "devices": []}
    for i in range(torch.cuda.device_count() if info["available"] else 0):
        gpu = {"index": i, "name": None, "free_bytes": None, "total_bytes": None, "capability": None}
        try:
            gpu["name"] = torch.cuda.get_device_name(i)
            gpu["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(i))
            free, total = torch.cuda.mem_get_info(i)
            gpu.update(free_bytes=int(free), total_bytes=int(total))
        except Exception as exc:  # noqa: BLE001 - a GPU that cannot be queried is itself a finding
            gpu["error"] = _why(exc)
        info["devices"].append(gpu)
    return info


def system_info() -> dict:
    """The interpreter, the platform, CPUs, and total/available RAM in bytes (from /proc/meminfo)."""
    found = {"executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
             "ram_total_bytes": None, "ram_available_bytes": None}
    with contextlib.suppress(OSError, KeyError, ValueError), open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
        found["ram_total_bytes"] = int(fields["MemTotal"].split()[0]) * 1024
        found["ram_available_bytes"] = int(fields["MemAvailable"].split()[0]) * 1024
    return found


def check_4bit(device: str | None, dtype) -> dict:
    """A random weight in nf4 through bitsandbytes' 4-bit matmul (decode and prefill shapes): `max_error` against
    float math on the dequantized weight, `quantization_error` against the float weight (nf4 is ~0.1)."""
    import torch

    result = {**dict.fromkeys(("ran", "ok", "device", "dtype", "max_error", "quantization_error", "tolerance",
                               "error", "seconds")), "ran": False, "ok": False}
    if device is None:
        return {**result, "error": "no usable device"}
    start = time.perf_counter()
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    result.update(device=device, dtype=str(dtype).replace("torch.", ""), tolerance=tolerance)
    try:
        from ..runtime.model import import_bitsandbytes

        bnb = import_bitsandbytes()  # before any other bitsandbytes import: it must not reach the hub
        import bitsandbytes.functional as F

        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(256, 512, generator=gen).to(device=device, dtype=dtype)
        qweight, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
        dequant = F.dequantize_4bit(qweight, state).float()
        worst, quant_err = 0.0, 0.0
        for rows in (1, 8):  # 1 row takes the gemv (decoding) kernel, 8 rows the prefill path
            x = torch.randn(rows, 512, generator=gen).to(device=device, dtype=dtype)
            y = bnb.matmul_4bit(x, qweight.t(), quant_state=state).float()
            ref = x.float() @ dequant.t()
            full = x.float() @ weight.float().t()
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
            quant_err = max(quant_err, float((y - full).norm() / full.norm()))
        result.update(ran=True, max_error=worst, quantization_error=quant_err,
                      ok=bool(worst <= tolerance and quant_err <= 0.25))
        if not result["ok"]:
            result["error"] = f"4-bit matmul is off by {worst:.3g} (tolerance {tolerance})"
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        result["error"] = _why(exc, 300)
    result["seconds"] = round(time.perf_counter() - start, 4)
    return result


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size  # follows HF cache symlinks to the blobs
    return total


INDEX = "model.safetensors.index.json"


def _why(exc: BaseException, limit: int = 200) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


def check_folder(folder: str) -> tuple[dict | None, list[str], list[str]]:
    """(config.json's object or None, the files loading needs that are missing, what cannot be read as `file: why`),
    checked cheaply without loading weights: config.json and the index parse as JSON objects, each weight file's
    safetensors header parses (metadata only)."""
    from safetensors import safe_open

    config, problems = None, []
    missing = [] if os.path.exists(os.path.join(folder, "config.json")) else ["config.json"]
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if not isinstance(config, dict) or not isinstance(config.get("quantization_config", {}), dict):
            config = None
            raise ValueError("not a JSON object, or its quantization_config is not")
    except FileNotFoundError:
        pass  # reported as missing
    except (OSError, ValueError) as exc:
        problems.append(f"config.json: {_why(exc)}")
    index = os.path.join(folder, INDEX)
    try:  # the weight files loading reads: the index's shards, else every .safetensors file
        if os.path.exists(index):
            with open(index) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            if not all(isinstance(name, str) for name in shards):
                raise ValueError("weight_map holds a value that is not a file name")
            names = sorted(shards)
        else:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except (OSError, ValueError, AttributeError, TypeError) as exc:  # an index that is no object; lists as names
        names = []
        problems.append(f"{INDEX}: {_why(exc)}")
    if not names and not os.path.exists(index):
        missing.append("model.safetensors")
    for name in names:
        if not os.path.exists(os.path.join(folder, name)):
            missing.append(name)
            continue
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass  # the header is read, and checked to cover the file, as it opens
        except Exception as exc:  # noqa: BLE001 - SafetensorError or OSError: the finding
            problems.append(f"{name}: {_why(exc)}")
    listed = set(os.listdir(folder))
    missing += [one for one, other in (("preprocessor_config.json", "processor_config.json"),
                                       ("tokenizer.json", "tokenizer.model")) if not {one, other} & listed]
    return config, missing, problems


def model_files(model: str, revision: str | None) -> dict:
    """Where the model's files are: a local folder, the HF cache (which commit), or nowhere yet; `available` when
    none is `missing` and none `unreadable` (as `check_folder()` checks: headers, not weights)."""
    from ..hub import looks_local

    found = {"id": model, "revision": revision, "local_folder": False, "available": False, "path": None,
             "commit": None, "missing": [], "unreadable": [], "size_bytes": None, "pre_quantized": None}
    if looks_local(model):
        folder = os.path.expanduser(model)
        found.update(local_folder=True, path=os.path.abspath(folder) if os.path.isdir(folder) else None)
        if not os.path.isdir(folder):
            return {**found, "missing": [model]}
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an invalid repo id is "not cached"
            cached = None
        if not isinstance(cached, str):
            return {**found, "missing": ["config.json"]}
        folder = os.path.dirname(cached)
        found.update(path=folder, commit=os.path.basename(folder))
    config, missing, bad = check_folder(folder)
    found.update(missing=missing, unreadable=bad, available=not missing and not bad, size_bytes=dir_size(folder))
    qc = (config or {}).get("quantization_config")
    if qc:
        found["pre_quantized"] = qc.get("bnb_4bit_quant_type") if qc.get("load_in_4bit") else qc.get(
            "quant_method", "yes")
    return found


def _count_parameters(config) -> tuple[int, int, int]:
    """(all parameters, parameters in linear layers that bitsandbytes would quantize, the head's parameters if it
    shares the input embedding's weight, else 0), on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    skip = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not skip)
    tied = skip.weight.numel() if skip.weight is model.get_input_embeddings().weight else 0
    return total, linear, tied


def page_images(folder: str, split: bool) -> int:
    """How many images the model's image processor makes of a blank page of the default render size."""
    from PIL import Image
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    if hasattr(image_processor, "do_image_splitting"):
        image_processor.do_image_splitting = split
    pixels = image_processor([[Image.new("RGB", (1386, 1960), "white")]], return_tensors="pt")["pixel_values"]
    return int(pixels.shape[1])  # [batch, images, channels, height, width]


def image_tokens_per_image(config, processor_config_path: str | None) -> int:
    """`image_seq_len` of processor_config.json, else the perceiver's latents (what each image becomes)."""
    seq_len = None
    if processor_config_path and os.path.exists(processor_config_path):
        with open(processor_config_path) as f:
            seq_len = json.load(f).get("image_seq_len")
    seq_len = seq_len or getattr(getattr(config, "perceiver_config", None), "resampler_n_latents", None)
    if not seq_len:
        raise ValueError("neither processor_config.json nor config.json says how many tokens an image takes")
    return int(seq_len)


def memory_estimate(config_path: str, processor_config_path: str | None, quant: str, split: bool, dtype_bytes: int,
                    max_new_tokens: int, cuda: bool) -> dict:
    """Bytes needed to answer about one page: weights + KV cache + activations (+ CUDA context)."""
    from transformers import AutoConfig

    folder = os.path.dirname(config_path)
    config = AutoConfig.from_pretrained(folder)
    total, linear, tied = _count_parameters(config)
    scales = 1 / 64 + 8 / (64 * 256) if cuda else 4 / 64  # double-quantized block scales; on the CPU float32
    per_param = {"4bit": 0.5 + scales, "8bit": 1.0}.get(quant)
    if per_param is None:
        per_param, linear = dtype_bytes, 0
    weights = linear * per_param + (total - linear) * dtype_bytes
    if not cuda and dtype_bytes == 4:  # the CPU's prepacked head (runtime/model.py) is a copy of a shared weight
        weights += tied * 4
    seq_len = image_tokens_per_image(config, processor_config_path)
    images = page_images(folder, split)
    text = config.get_text_config()
    prompt = seq_len * images + images + 1 + 32  # image tokens, fake tokens, template + a question
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * (prompt + max_new_tokens) * dtype_bytes
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    activations = images * patches * (3 * vision.hidden_size + vision.intermediate_size) * dtype_bytes
    overhead = int(0.5 * GIB) if cuda else 0
    return {"parameters": int(total), "quantized_parameters": int(linear), "bytes_per_quantized_parameter":
            round(per_param, 4), "weights_bytes": int(weights), "image_tokens_per_image": int(seq_len),
            "images_per_page": images, "prompt_tokens": int(prompt), "max_new_tokens": max_new_tokens,
            "kv_cache_bytes": int(kv), "activations_bytes": int(activations), "overhead_bytes": overhead,
            "total_bytes": int(weights + kv + activations + overhead)}


def diagnose(options) -> dict:
    """Every check, as one JSON-ready dict (`ok` and `reason` hold the verdict)."""
    from .. import extras, process
    from ..errors import IdeficsError
    from ..hub import local_only
    from ..runtime.engine import QUANT_NAMES
    from ..runtime.families import refusal
    from ..runtime.model import resolve_device, resolve_dtype

    local = local_only(options)  # not cached and cannot be fetched: one error at once, before the checks
    process.quiet_loaded()
    report: dict = {"schema": SCHEMA, "ok": False, "reason": None, "versions": versions(), "system": system_info(),
                    "cuda": cuda_info()}
    problems: list[str] = []
    try:
        device = resolve_device(options.device)
    except IdeficsError as err:
        device = None
        problems.append(err.message)
    cuda = bool(device and device.startswith("cuda"))
    dtype = resolve_dtype(options.dtype, device or "cpu")
    files = model_files(options.model, options.revision)
    quant, why = _quant(options, files, local)
    report.update(setup={"model": options.model, "revision": options.revision, "quant": quant,
                         "quantization": QUANT_NAMES[quant], "quantization_reason": why,
                         "dtype": str(dtype).replace("torch.", ""), "device": device or options.device,
                         "split": options.split}, bnb_4bit=check_4bit(device, dtype), model=files,
                  estimate=_estimate(options, files, local, quant, dtype, cuda),
                  extras=extras.report())  # optional features: reported, never a reason to fail

    if device and quant == "4bit" and not report["bnb_4bit"]["ok"]:
        problems.append(f"bitsandbytes 4-bit does not work on {device}: {report['bnb_4bit']['error']}")
    if quant == "8bit" and device and not cuda:
        problems.append("--quant 8bit needs a CUDA GPU")
    if files["unreadable"]:
        problems.append(f"{options.model} cannot be read: {'; '.join(files['unreadable'][:3])} (copy or pull it again)")
    elif files["available"] and (refused := refusal(options)):
        problems.append(refused)
    elif files["local_folder"] and files["path"] is None:
        why = "is not a folder" if os.path.exists(os.path.expanduser(options.model)) else "does not exist"
        problems.append(f"model folder {options.model!r} {why}")
    elif not files["available"]:
        where = "the local folder" if files["local_folder"] else "the local HF cache"
        hint = "" if files["local_folder"] else f" (run `idefics pull {options.model}`)"
        problems.append(f"{options.model} is not complete in {where}, missing {', '.join(files['missing'][:3])}{hint}")
    need, free = report["estimate"].get("total_bytes"), free_bytes(report["cuda"], device)
    report["estimate"].update(free_bytes=free, fits=None if need is None or free is None else need <= free)
    if report["estimate"]["fits"] is False and cuda:
        problems.append(f"needs about {human_bytes(need)} but {device} has {human_bytes(free)} free"
                        " (try --quant 4bit or --no-split)")
    report.update(ok=not problems, reason="; ".join(problems) or None)
    return report


def _quant(options, files: dict, local: bool) -> tuple[str, str]:
    """The quantization a load would use, and why, decided as loading does (`chosen_quant`): from the config at hand,
    fetched only for `--quant auto`."""
    from ..runtime.families import chosen_quant, read_config

    at_hand = os.path.join(files["path"], "config.json") if files["path"] else None
    try:
        if at_hand and os.path.exists(at_hand):
            with open(at_hand) as f:
                return chosen_quant(options.quant, json.load(f))
        return chosen_quant(options.quant, read_config(options, local) if options.quant == "auto" else {})
    except Exception as exc:  # noqa: BLE001 - no config yet: what a load of an 8B model would do
        if options.quant != "auto":
            return options.quant, f"--quant {options.quant}"
        return "4bit", f"auto: config.json unreadable ({type(exc).__name__}), assumed 4B parameters or more"


def free_bytes(cuda: dict, device: str | None) -> int | None:
    """Free memory on the device: the GPU's from `cuda_info()`, else the RAM available."""
    if device is None:
        return None
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return next((g["free_bytes"] for g in cuda["devices"] if g["index"] == index), None)
    return system_info()["ram_available_bytes"]


def _estimate(options, files: dict, local: bool, quant: str, dtype, cuda: bool) -> dict:
    """The memory estimate from the local config.json, fetched first when not cached and the hub can be reached."""
    folder = files["path"]
    config = os.path.join(folder, "config.json") if folder else None
    try:
        if not (config and os.path.exists(config)) and not local:
            from huggingface_hub import hf_hub_download

            config = hf_hub_download(options.model, "config.json", revision=options.revision, etag_timeout=5)
            folder = os.path.dirname(config)
            for name in ("processor_config.json", "preprocessor_config.json"):
                with contextlib.suppress(Exception):  # optional here: missing, the estimate says what is
                    hf_hub_download(options.model, name, revision=options.revision, etag_timeout=5)
        if not (config and os.path.exists(config)):
            return {"error": "config.json is not in the local cache" + (" (offline)" if options.offline else "")}
        import torch

        nbytes = torch.empty((), dtype=dtype).element_size()
        return memory_estimate(config, os.path.join(folder, "processor_config.json"), quant, options.split, nbytes,
                               options.max_new_tokens, cuda)
    except Exception as exc:  # noqa: BLE001 - the estimate is advisory
        return {"error": _why(exc, 300)}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
