"""Model families: what differs between Idefics2, Idefics3 (SmolVLM v1, SmolDocling, granite-docling) and SmolVLM2.

`detect(options, local_files_only)` reads config.json (no weights): (its `Family`, the config), or a one-line
`IdeficsError("model_error")` for another model type or a processor that cannot be built here. `chosen_quant(quant,
config)` is what a load quantizes to and why. `render_side(options)` and `doctags(options)` read the files at hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import IdeficsError

NF4_FROM = 4 * 10**9  # --quant auto: nf4 from this many parameters, none below
DOCTAG = "<doctag>"  # a token of the document models' tokenizers


@dataclass(frozen=True)
class Family:
    name: str
    sized: bool  # image tokens depend on the image's size (rows x cols of tiles): a prompt's ids come with its pixels
    image_kwargs: dict = field(default_factory=dict)  # asked of its image processor with every image
    needs: tuple = ()  # modules its processor imports: (module, pip name)

    def expand(self, processor, texts: list[str], grids: list[tuple[int, int]]) -> list[str]:
        """`texts` with each image token expanded as the processor does for `grids` [(rows, cols)] (0, 0: unsplit)."""
        info = {"rows": [[r for r, _ in grids]], "cols": [[c for _, c in grids]]}
        replacements = [processor.replace_image_token(info, k) for k in range(len(grids))]
        return processor.get_text_with_replacements(list(texts), images_replacements=replacements)[0]


IDEFICS2 = Family("idefics2", sized=False)
IDEFICS3 = Family("idefics3", sized=True, image_kwargs={"return_row_col_info": True})
SMOLVLM = Family("smolvlm", sized=True, image_kwargs={"return_row_col_info": True},
                 needs=(("num2words", "num2words"), ("torchvision", "torchvision")))
FAMILIES = {f.name: f for f in (IDEFICS2, IDEFICS3, SMOLVLM)}
SUPPORTED = "Idefics2, Idefics3 (Idefics3-8B, SmolVLM, SmolDocling, granite-docling) and SmolVLM2"


def for_processor(processor) -> Family:
    """The family of a loaded processor (Idefics2's when it is none of the others)."""
    name = type(processor).__name__
    return IDEFICS3 if name == "Idefics3Processor" else SMOLVLM if name == "SmolVLMProcessor" else IDEFICS2


def _folder(options, need: str = "processor") -> str | None:
    """The checkpoint's folder at hand: the local one, or its cached snapshot (None: not cached)."""
    from ..hub import cached_snapshot, looks_local

    if looks_local(options.model):
        return os.path.expanduser(options.model)
    return cached_snapshot(options.model, options.revision, need=need)


def render_side(options) -> int | None:
    """The longest side pages are rendered at for this checkpoint, from its files at hand (None: the default)."""
    folder = _folder(options)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            if not FAMILIES.get(json.load(f).get("model_type"), IDEFICS2).sized:
                return None
        for name in ("preprocessor_config.json", "processor_config.json"):
            if os.path.exists(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    data = json.load(f)
                return int(data.get("image_processor", data)["size"]["longest_edge"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def doctags(options) -> bool:
    """Whether the checkpoint at hand is a document model answering in DocTags (its tokenizer has `<doctag>`)."""
    folder = _folder(options)
    for name in ("tokenizer_config.json", "tokenizer.json"):
        try:
            with open(os.path.join(folder, name)) as f:
                if f'"{DOCTAG}"' in f.read():
                    return True
        except (OSError, TypeError):
            continue
    return False


def read_config(options, local_files_only: bool) -> dict:
    """config.json of the checkpoint: the local folder's, the cached one, or fetched alone from the hub (ValueError:
    not a JSON object, or its quantization_config is not)."""
    folder = _folder(options, need="model")
    if folder:
        path = os.path.join(folder, "config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(options.model, "config.json", revision=options.revision,
                               local_files_only=local_files_only)
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict) or not isinstance(config.get("quantization_config") or {}, dict):
        raise ValueError("config.json is not a JSON object, or its quantization_config is not")
    return config


def _importable(module: str) -> bool:
    """Whether `module` imports (torchvision may be installed and still fail to load)."""
    import importlib

    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - ImportError, or a binary that does not load (torchvision::nms)
        return False


def detect(options, local_files_only: bool) -> tuple[Family, dict]:
    """The checkpoint's family and config.json, before anything heavy is loaded (OSError/ValueError: unreadable)."""
    config = read_config(options, local_files_only)
    kind = config.get("model_type")
    family = FAMILIES.get(kind)
    if family is None:
        raise IdeficsError("model_error", f"{options.model} is a {kind or 'unknown'} model; idefics-cli runs "
                           f"{SUPPORTED}", "point --model at a checkpoint of one of these families")
    missing = [pip for module, pip in family.needs if not _importable(module)]
    if missing:
        raise IdeficsError("model_error", f"{options.model} is a SmolVLM2 checkpoint, whose processor needs "
                           f"{' and '.join(missing)}", f"pip install {' '.join(missing)}")
    return family, config


def parameters(config: dict) -> int:
    """All parameters of the model a config.json describes, counted on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def refusal(options) -> str | None:
    """Why a load would refuse the checkpoint at hand (its architecture, a processor's missing package); None if not,
    or if its config.json cannot be read (doctor reports that)."""
    try:
        detect(options, True)
    except IdeficsError as err:
        return err.message
    except (OSError, ValueError):
        pass
    return None


def chosen_quant(quant: str, config: dict) -> tuple[str, str]:
    """The quantization a load uses and why (`quantization_reason`): a checkpoint saved quantized loads as saved,
    whatever `--quant` asks; `auto` is nf4 from NF4_FROM parameters (counted from `config`), none below."""
    saved = config.get("quantization_config") or {}
    if saved.get("load_in_4bit"):
        return "4bit", f"the checkpoint is saved in {saved.get('bnb_4bit_quant_type') or 'nf4'}"
    if saved:
        return "8bit", f"the checkpoint is saved in {'int8' if saved.get('load_in_8bit') else 'a quantized format'}"
    if quant != "auto":
        return quant, f"--quant {quant}"
    n = parameters(config)
    if n >= NF4_FROM:
        return "4bit", f"auto: {n / 1e9:.1f}B parameters: nf4 from 4B"
    return "none", f"auto: {n / 1e9:.2f}B parameters: unquantized below 4B"
