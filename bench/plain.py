"""The baselines: the idefics2-8b model card's plain transformers code, run as its own process.

    python bench/plain.py ask MODEL IMAGE QUESTION [--max-new-tokens N]   # answer streamed to stdout
    python bench/plain.py loop MODEL PDF PROMPT [--max-new-tokens N]      # JSON {"seconds", "texts"}
        [--quant 4bit|none] [--side PX]   # loading (default the 4-bit snippet) and render size (default 1960)

Loading is the model card's 4-bit snippet (AutoProcessor, BitsAndBytesConfig nf4 + double quant), on the
CPU in float32 or on CUDA in `--dtype`. `ask` streams each new piece of text as soon as it is decoded (so
its time to first token is a fair baseline); `loop` renders each page of the PDF (longest side 1960 px),
runs the processor and `generate` one page at a time, and reports the seconds spent in that loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def load(model_dir: str, device: str, dtype: str, quant: str = "4bit"):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch_dtype, device_map={"": device},
        quantization_config=quantization_config if quant == "4bit" else None)
    return processor, model


def inputs_for(processor, model, image, question: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=[image], return_tensors="pt").to(model.device)


def ask(args) -> None:
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    processor, model = load(args.model, args.device, args.dtype)
    image = Image.open(args.image).convert("RGB")
    tokenizer = processor.tokenizer

    class Streamer(BaseStreamer):
        """Writes each new piece of the decoded answer at once (no waiting for a word to end)."""

        def __init__(self):
            self.ids, self.shown, self.prompt = [], "", True

        def put(self, value):
            if self.prompt:
                self.prompt = False
                return
            self.ids.extend(value.reshape(-1).tolist())
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.startswith(self.shown) and len(text) > len(self.shown) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(self.shown):])
                sys.stdout.flush()
                self.shown = text

        def end(self):
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            sys.stdout.write(text[len(self.shown):] + "\n")
            sys.stdout.flush()

    inputs = inputs_for(processor, model, image, args.question)
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=Streamer())


def loop(args) -> None:
    import pymupdf
    from PIL import Image

    processor, model = load(args.model, args.device, args.dtype, args.quant)
    texts = []
    start = time.perf_counter()
    with pymupdf.open(args.pdf) as doc:
        for page in doc:
            scale = args.side / max(page.rect.width, page.rect.height)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
            image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
            inputs = inputs_for(processor, model, image, args.question)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            texts.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    print(json.dumps({"seconds": time.perf_counter() - start, "texts": texts}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["ask", "loop"])
    p.add_argument("model")
    p.add_argument("source", help="IMAGE for ask, PDF for loop")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", default="4bit", choices=["4bit", "none"], help="none: the SmolVLM model card's load")
    p.add_argument("--side", type=int, default=1960, help="loop: render each page to this longest side (px)")
    args = p.parse_args(argv)
    args.image = args.pdf = args.source
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    (ask if args.mode == "ask" else loop)(args)


if __name__ == "__main__":
    main()
