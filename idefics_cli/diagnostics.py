"""Diagnostics: what the processor really feeds the model (`crops`), and whether a setup can run (`doctor`).

Contract:
- `load_processor(options)` loads only the processor (no weights) the way `model.load` does.
- `model_images(processor, image)` runs the processor on one page image and takes the images back out of
  `pixel_values`: de-normalized (x * std + mean, / rescale factor, rounded, uint8) and cropped to the
  `pixel_attention_mask`, so they are exactly the pixels the vision encoder sees. The count comes from the
  processor output (5 with idefics2 splitting, 1 without, whatever an Idefics3-style processor makes).
- `contact_sheet(panels, labels, title)` lays panels out (2 x 2 crops + the whole page when there are 5,
  else one row) under label strips and returns the sheet and each panel's top-left corner.
- Doctor checks, each returning plain JSON-ready dicts: `versions()`, `cuda_info()`, `system_info()`,
  `check_4bit(device, dtype)` (a real bitsandbytes nf4 quantize + `matmul_4bit`, compared with float),
  `model_files(model, revision)` (local folder or HF cache, complete or not, commit, size) and
  `memory_estimate(...)` (parameters counted from config.json on the meta device, bytes per parameter for
  the quantization, KV cache for one page's prompt).
torch, transformers, bitsandbytes and PIL are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from .errors import IdeficsError

POSITIONS_5 = ("top-left", "top-right", "bottom-left", "bottom-right", "whole")
GIB = 2**30


# ---- crops -------------------------------------------------------------------------------------
def load_processor(options):
    """The processor alone (no model weights), with `do_image_splitting` set from `options.split`."""
    from .hub import local_only, looks_local
    from .model import model_error, quiet_libraries

    if options.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if looks_local(options.model) and not os.path.isdir(options.model):
        raise IdeficsError("model_error", f"model folder {options.model!r} does not exist")
    offline = local_only(options, need="processor")  # not cached and no hub: fails here, in a second
    quiet_libraries()
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(options.model, revision=options.revision,
                                                  local_files_only=offline, trust_remote_code=False)
    except Exception as exc:  # OSError/ValueError from transformers and huggingface_hub
        raise model_error(exc, options) from exc
    if hasattr(processor.image_processor, "do_image_splitting"):
        processor.image_processor.do_image_splitting = options.split
    return processor


def position_names(n: int) -> list[str]:
    if n == len(POSITIONS_5):
        return list(POSITIONS_5)
    if n == 1:
        return ["whole"]
    return [f"tile-{k + 1}" for k in range(n - 1)] + ["whole"]


def denormalize(pixel_values, pixel_attention_mask, image_processor) -> list:
    """[n, 3, H, W] normalized floats (+ [n, H, W] mask) -> n RGB PIL images, padding cropped away."""
    import numpy as np
    import torch
    from PIL import Image

    x = pixel_values.detach().to("cpu", torch.float64)
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(1, -1, 1, 1)
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / image_processor.rescale_factor
    pixels = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = []
    for k in range(pixels.shape[0]):
        arr = pixels[k]
        if pixel_attention_mask is not None:
            mask = pixel_attention_mask[k].bool().cpu().numpy()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size and cols.size:
                arr = arr[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        images.append(Image.fromarray(np.ascontiguousarray(arr), "RGB"))
    return images


def model_images(processor, image) -> tuple[list, list[str], int]:
    """(images the model sees for one page, their position names, image tokens in the prompt)."""
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    mask = inputs.get("pixel_attention_mask")
    images = denormalize(inputs["pixel_values"][0], None if mask is None else mask[0], processor.image_processor)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return images, position_names(len(images)), int((inputs["input_ids"][0] == image_token_id).sum())


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def font_size(sizes: list[tuple[int, int]]) -> int:
    """Label font size in px, growing with the panels so labels stay readable when the sheet is scaled down."""
    return max(14, min(40, min(w for w, _ in sizes) // 28))


def sheet_layout(sizes: list[tuple[int, int]]):
    """Top-left corners of each panel (the image, under its label strip) and the sheet size."""
    fs = font_size(sizes)
    label_h, gap, top = int(fs * 1.6), max(8, fs // 2), int(fs * 2.6)
    if len(sizes) == 5:  # 2 x 2 crops in their places, the whole page to the right
        col_w = [max(sizes[0][0], sizes[2][0]), max(sizes[1][0], sizes[3][0])]
        row_h = [max(sizes[0][1], sizes[1][1]), max(sizes[2][1], sizes[3][1])]
        xs, ys = [gap, 2 * gap + col_w[0]], [top + label_h, top + 2 * label_h + gap + row_h[0]]
        corners = [(xs[k % 2], ys[k // 2]) for k in range(4)]
        corners.append((3 * gap + sum(col_w), top + label_h))
        width = corners[4][0] + sizes[4][0] + gap
        height = max(ys[1] + row_h[1], corners[4][1] + sizes[4][1]) + gap
        return corners, (width, height)
    corners, x = [], gap
    for w, _ in sizes:
        corners.append((x, top + label_h))
        x += w + gap
    return corners, (x, top + label_h + max(h for _, h in sizes) + gap)


def contact_sheet(panels: list, labels: list[str], title: str):
    """One PNG-ready image: a title line, then every panel under its label. Returns (sheet, corners)."""
    from PIL import Image, ImageDraw

    sizes = [p.size for p in panels]
    corners, size = sheet_layout(sizes)
    fs = font_size(sizes)
    sheet = Image.new("RGB", size, (34, 34, 38))
    draw = ImageDraw.Draw(sheet)
    draw.text((max(8, fs // 2), fs // 2), title, fill=(240, 240, 240), font=_font(int(fs * 1.2)))
    font = _font(fs)
    for panel, label, (x, y) in zip(panels, labels, corners, strict=True):
        draw.text((x, y - int(fs * 1.35)), label, fill=(255, 214, 102), font=font)
        sheet.paste(panel, (x, y))
    return sheet, corners


# ---- doctor ------------------------------------------------------------------------------------
PACKAGES = {"torch": "torch", "transformers": "transformers", "bitsandbytes": "bitsandbytes",
            "accelerate": "accelerate", "pymupdf": "PyMuPDF", "pillow": "pillow", "huggingface_hub": "huggingface_hub",
            "idefics_cli": "idefics-cli"}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            found[key] = version(dist)
        except PackageNotFoundError:
            found[key] = None
    return found


def cuda_info() -> dict:
    import torch

    info = {"available": bool(torch.cuda.is_available()), "version": torch.version.cuda, "devices": []}
    if info["available"]:
        for i in range(torch.cuda.device_count()):
            gpu = {"index": i, "name": None, "free_bytes": None, "total_bytes": None, "capability": None}
            try:
                gpu["name"] = torch.cuda.get_device_name(i)
                gpu["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(i))
                free, total = torch.cuda.mem_get_info(i)
                gpu.update(free_bytes=int(free), total_bytes=int(total))
            except Exception as exc:  # noqa: BLE001 - a GPU that cannot be queried is itself a finding
                gpu["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            info["devices"].append(gpu)
    return info


def system_info() -> dict:
    """The interpreter, the platform, CPUs, and total/available RAM in bytes (from /proc/meminfo)."""
    found = {"executable": sys.executable, "platform": platform.platform(), "cpus": os.cpu_count(),
             "ram_total_bytes": None, "ram_available_bytes": None}
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        found["ram_total_bytes"] = int(fields["MemTotal"].split()[0]) * 1024
        found["ram_available_bytes"] = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return found


def check_4bit(device: str, dtype) -> dict:
    """Quantize a random weight to nf4 and run bitsandbytes' 4-bit matmul (decode and prefill shapes).

    `max_error`: the kernel against float math on the dequantized weight (relative to the largest output);
    `quantization_error`: relative error against the original float weight (nf4 is ~0.1).
    """
    import torch

    start = time.perf_counter()
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    result = {"ran": False, "ok": False, "device": device, "dtype": str(dtype).replace("torch.", ""),
              "max_error": None, "quantization_error": None, "tolerance": tolerance, "error": None, "seconds": None}
    try:
        import bitsandbytes as bnb
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
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    result["seconds"] = round(time.perf_counter() - start, 4)
    return result


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size  # follows HF cache symlinks to the blobs
            except OSError:
                pass
    return total


def _missing_weights(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        return [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if any(n.endswith(".safetensors") for n in os.listdir(folder)):
        return []
    return ["model.safetensors"]


def model_files(model: str, revision: str | None) -> dict:
    """Where the model's files are: a local folder, the HF cache (which commit), or nowhere yet."""
    from .hub import looks_local

    found = {"id": model, "revision": revision, "local_folder": False, "available": False, "path": None,
             "commit": None, "missing": [], "size_bytes": None, "pre_quantized": None}
    if looks_local(model):
        found["local_folder"] = True
        folder = os.path.expanduser(model)
        if not os.path.isdir(folder):
            found["missing"] = [model]
            return found
        found["path"] = os.path.abspath(folder)
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an invalid repo id is "not cached"
            cached = None
        if not isinstance(cached, str):
            found["missing"] = ["config.json"]
            return found
        folder = os.path.dirname(cached)
        found["path"], found["commit"] = folder, os.path.basename(folder)
    missing = [] if os.path.exists(os.path.join(folder, "config.json")) else ["config.json"]
    missing += _missing_weights(folder)
    names = os.listdir(folder)
    if not {"preprocessor_config.json", "processor_config.json"} & set(names):
        missing.append("preprocessor_config.json")
    if not {"tokenizer.json", "tokenizer.model"} & set(names):
        missing.append("tokenizer.json")
    found.update(missing=missing, available=not missing, size_bytes=_dir_size(folder))
    if "config.json" not in missing:
        with open(os.path.join(folder, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
        if qc:
            found["pre_quantized"] = qc.get("bnb_4bit_quant_type") if qc.get("load_in_4bit") else qc.get(
                "quant_method", "yes")
    return found


def _count_parameters(config) -> tuple[int, int]:
    """(all parameters, parameters in linear layers that bitsandbytes would quantize), on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    skip = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not skip)
    return total, linear


def memory_estimate(config_path: str, processor_config_path: str | None, quant: str, split: bool, dtype_bytes: int,
                    max_new_tokens: int, cuda: bool) -> dict:
    """Bytes needed to answer about one page: weights + KV cache + activations (+ CUDA context)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.dirname(config_path))
    total, linear = _count_parameters(config)
    per_param = {"4bit": 0.5 + 1 / 64 + 8 / (64 * 256), "8bit": 1.0}.get(quant)  # nf4 + double-quant absmax
    if per_param is None:
        per_param, linear = dtype_bytes, 0
    weights = linear * per_param + (total - linear) * dtype_bytes
    seq_len = None
    if processor_config_path and os.path.exists(processor_config_path):
        with open(processor_config_path) as f:
            seq_len = json.load(f).get("image_seq_len")
    perceiver = getattr(config, "perceiver_config", None)
    seq_len = seq_len or getattr(perceiver, "resampler_n_latents", None) or 64
    images = 5 if split else 1
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


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
