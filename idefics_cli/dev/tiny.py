"""Build a small, randomly initialised model of a family with its real checkpoint's tokens, template and settings.

`build(out_dir, size="tiny", family="idefics2")` writes a folder that loads like idefics2-8b (or, for idefics3 and
smoldocling, SmolVLM-256M-Instruct's processor; docs/families.md) with random weights, linear layers multiples of 64
wide. The tokenizer is the bundled Mistral-7B-v0.1 sentencepiece model (needs `idefics-cli[tiny]`).

    python -m idefics_cli.dev.tiny OUT_DIR [--family idefics2|idefics3|smoldocling] [--size tiny|mid|full]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile

CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 32002], "pad_token_id": 0, "bad_words_ids": [[32000], [32001]]}
PROCESSOR = {"do_image_splitting": True, "size": {"shortest_edge": 378, "longest_edge": 980}}
TOKENIZER_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                              "mistral-tokenizer.model.v1")
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

# (vision hidden, vision mlp, vision layers, vision heads, text hidden, text mlp, text layers, heads, kv heads,
#  perceiver depth, perceiver heads, perceiver head dim, perceiver kv heads)
SIZES = {
    "tiny": (64, 128, 2, 2, 128, 256, 2, 4, 2, 1, 2, 64, 1),
    # mid: the benchmarks' model; like idefics2-8b, its time goes to decoding (16 text layers), not vision
    "mid": (64, 256, 1, 1, 512, 512, 16, 8, 4, 1, 4, 64, 2),
    "full": (1152, 4304, 27, 16, 4096, 14336, 32, 32, 8, 3, 16, 96, 4),
}


# idefics3: SmolVLM-256M-Instruct's template (bos in it), processor (512 px tiles of a 2048 px page) and tokens
SMOL_TEMPLATE = "<|im_start|>" + CHAT_TEMPLATE.replace("message['role'].capitalize()", "message['role'] | capitalize")
SMOL_PROCESSOR = {"do_image_splitting": True, "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
                  "resample": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
GRID_TOKENS = ["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
DOCTAGS = ["<doctag>", "</doctag>", "<text>", "</text>", "<title>", "</title>", "<section_header_level_1>",
           "</section_header_level_1>", "<page_header>", "</page_header>", "<page_footer>", "</page_footer>",
           "<list_item>", "</list_item>", "<unordered_list>", "</unordered_list>", "<picture>", "</picture>",
           "<caption>", "</caption>", "<otsl>", "</otsl>", "<fcel>", "<ecel>", "<ched>", "<nl>", "<code>", "</code>",
           "<formula>", "</formula>"] + [f"<loc_{k}>" for k in range(501)]
# (vision hidden, vision mlp, vision layers, vision heads, text hidden, text mlp, text layers, heads, kv heads)
SMOL_SIZES = {"tiny": (64, 128, 2, 2, 128, 256, 2, 4, 2), "smolvlm-256m": (768, 3072, 12, 12, 576, 1536, 30, 9, 3),
              "smolvlm-2b": (1152, 4304, 27, 16, 2048, 8192, 24, 32, 32),
              "idefics3-8b": (1152, 4304, 27, 16, 4096, 14336, 32, 32, 8)}
# (patch, tile px, pixel-shuffle scale, page longest_edge): SmolVLM-256M's (64 tokens a tile), sizes that differ
SMOL_256M_IMAGE = (16, 512, 4, 2048)
SMOL_IMAGE = {"smolvlm-2b": (14, 384, 3, 1536), "idefics3-8b": (14, 364, 2, 1456)}


def tokenizer_model_path() -> str:
    """The bundled Mistral-7B-v0.1 sentencepiece model, verified; ModuleNotFoundError if it cannot be read."""
    from ..extras import _importable

    missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if not _importable(module)]
    if missing:  # transformers would fall back to a tiktoken reader and fail with a misleading message
        raise ModuleNotFoundError(f"the tiny model's tokenizer needs {' and '.join(missing)}: "
                                  "pip install 'idefics-cli[tiny]'")
    with open(TOKENIZER_FILE, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != TOKENIZER_SHA256:
            raise RuntimeError(f"{TOKENIZER_FILE} is not the Mistral-7B-v0.1 tokenizer (sha256 mismatch)")
    return TOKENIZER_FILE


def _towers(row: tuple, patch: int, image_size: int, **text) -> tuple[dict, dict]:
    """The vision and text config dicts of a SIZES or SMOL_SIZES row (its first 9 columns)."""
    vision = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return (dict(zip(vision, row[:4]), patch_size=patch, image_size=image_size),
            dict(zip((*vision, "num_key_value_heads"), row[4:9]), rms_norm_eps=1e-5, **text))


def config(size: str = "tiny"):
    """The Idefics2Config of the given size (text vocabulary and image arithmetic as idefics2-8b)."""
    from transformers import Idefics2Config

    *_, pd, pn, phd, pkv = SIZES[size]
    vision, text = _towers(SIZES[size], 14, 980, model_type="mistral", vocab_size=32003, max_position_embeddings=32768,
                           rope_theta=10000.0, pad_token_id=0)
    perceiver = dict(hidden_size=text["hidden_size"], rms_norm_eps=1e-5, resampler_n_latents=64, resampler_depth=pd,
                     resampler_n_heads=pn, resampler_head_dim=phd, num_key_value_heads=pkv)
    return Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text, image_token_id=32001,
                          tie_word_embeddings=False)


def _tokenizer(**settings):
    """The bundled sentencepiece model as a LlamaTokenizer with these tokenizer_config.json `settings`."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        shutil.copy(tokenizer_model_path(), os.path.join(tok_dir, "tokenizer.model"))
        with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                       "unk_token": "<unk>", "add_eos_token": False, "legacy": False, **settings}, f)
        return AutoTokenizer.from_pretrained(tok_dir)


def build_processor(out_dir: str, family: str = "idefics2", size: str = "tiny"):
    """Save the processor of `family` into out_dir: idefics2-8b's (real tokenizer, chat template, image settings), or
    SmolVLM-256M-Instruct's settings, template and special tokens (+ DocTags for smoldocling)."""
    from transformers import Idefics2Processor, Idefics3Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if family == "idefics2":
        processor = Idefics2Processor(image_processor=Idefics2ImageProcessorPil(**PROCESSOR),
                                      tokenizer=_tokenizer(pad_token="<unk>", add_bos_token=True), image_seq_len=64,
                                      chat_template=CHAT_TEMPLATE)
    else:
        tokenizer = _tokenizer(add_bos_token=False)
        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<fake_token_around_image>", "<image>", "<end_of_utterance>", *GRID_TOKENS, "<|im_start|>", "<|im_end|>"]})
        if family == "smoldocling":
            tokenizer.add_tokens(DOCTAGS, special_tokens=True)
        tokenizer.bos_token, tokenizer.pad_token = "<|im_start|>", "<|im_end|>"
        tokenizer.eos_token = "<end_of_utterance>"
        patch, tile, scale, side = SMOL_IMAGE.get(size, SMOL_256M_IMAGE)
        image_processor = Idefics3ImageProcessorPil(**{**SMOL_PROCESSOR, "size": {"longest_edge": side},
                                                       "max_image_size": {"longest_edge": tile}})
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=SMOL_TEMPLATE)
    processor.save_pretrained(out_dir)
    return processor


def smol_config(tokenizer, size: str = "tiny"):
    """An Idefics3Config of SmolVLM-256M's image arithmetic (512-px tiles, patch 16, scale 4: 64 tokens a tile)."""
    from transformers import Idefics3Config

    patch, tile, scale, _ = SMOL_IMAGE.get(size, SMOL_256M_IMAGE)
    ids = tokenizer.convert_tokens_to_ids
    vision, text = _towers(SMOL_SIZES[size], patch, tile, model_type="llama", vocab_size=len(tokenizer),
                           max_position_embeddings=8192, rope_theta=100000.0, pad_token_id=ids("<|im_end|>"),
                           bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"),
                           tie_word_embeddings=True)
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=ids("<image>"),
                          tie_word_embeddings=True, pad_token_id=ids("<|im_end|>"))


FAMILIES = ("idefics2", "idefics3", "smoldocling")


def build(out_dir: str, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None,
          family: str = "idefics2") -> str:
    """Write a random model of `family` and `size` with its checkpoint's tokenizer and settings to out_dir."""
    import torch
    from transformers import GenerationConfig, Idefics2ForConditionalGeneration, Idefics3ForConditionalGeneration

    from ..tasks.writers import follow_umask

    os.makedirs(out_dir, exist_ok=True)
    processor = build_processor(out_dir, family, size)
    if family == "idefics2":
        model_config, generation = config(size), GENERATION
    else:
        model_config = smol_config(processor.tokenizer, size)
        generation = {k: getattr(model_config.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    with torch.device(device):
        model = (Idefics2ForConditionalGeneration if family == "idefics2" else Idefics3ForConditionalGeneration)(
            model_config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out_dir)
    follow_umask(out_dir)  # transformers writes the weights 0600
    return out_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m idefics_cli.dev.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=FAMILIES, default="idefics2")
    parser.add_argument("--size", choices=sorted({*SIZES, *SMOL_SIZES}), default="tiny",
                        help="idefics2: tiny, mid, full; idefics3 and smoldocling: tiny, smolvlm-256m, smolvlm-2b, "
                        "idefics3-8b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tokenizer_model_path()  # sentencepiece or protobuf missing: say which extra, before torch loads
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        print(build(args.out_dir, args.size, args.seed, family=args.family), file=sys.stderr)
    except ModuleNotFoundError as exc:  # say which extra to install
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
