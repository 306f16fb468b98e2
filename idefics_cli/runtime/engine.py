"""The local engine: a loaded processor + model pair (interface.Engine) that prepares inputs and decodes them.

`Preparer` (the processor half, usable while the weights load) makes token ids for [(images, question)], images left
to vision.py; `LocalEngine` adds the model and runs rows through the one decode loop (decode.py), `schema` giving each
row its grammar. Token arithmetic is read from the processor and config. torch/transformers inside functions only.
"""

from __future__ import annotations

import os
import threading
import time

from ..errors import IdeficsError, UsageError, is_oom
from ..interface import Generation, ModelOptions, user_turn
from .decode import Loop, Row, run_rows, stream
from .families import DOCTAG, for_processor
from .vision import VisionInputs, auto_chunk, encode

QUANT_NAMES = {"4bit": "nf4", "8bit": "int8", "none": "none"}
PREFILL_CHUNK, PREFILL_CHUNK_ENV = 1024, "IDEFICS_PREFILL_CHUNK"  # prompt tokens prefilled at a time
CPU_BATCH_SIZE = 8  # pages decoding together on the CPU (LocalEngine.auto_batch_size)


class Preparer:
    """The processor half of an engine: model inputs for [(images, question), ...], weights loaded or not."""

    context_size: int | None = None  # the model's, once its config is loaded (LocalEngine)

    def __init__(self, processor, options: ModelOptions, device: str):
        self.processor, self.options, self.device = processor, options, device
        self.family = for_processor(processor)

    def prompt(self, n_images: int, question: str) -> str:
        return self.chat_text([user_turn(n_images, question)])

    def chat_text(self, messages: list[dict]) -> str:
        """The chat template's text of `messages` (transformers' format); text holding the image token itself
        (`<image>`, which would stand for an image not given) is a UsageError."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        images = sum(isinstance(part, dict) and part.get("type") == "image" for m in messages for part in m["content"])
        if text.count(self.processor.image_token) != images:
            raise UsageError(f"the text holds {self.processor.image_token}, the model's image token",
                             "write it another way")
        return text

    def build_inputs(self, batch: list[tuple[list, str]], split: bool | None = None, pixels: bool = True):
        """The model card's processor call (padded pixels, on the device): the reference path of tests and benches;
        `pixels=False`: the token ids alone. `split` overrides image splitting for this call only."""
        texts = [self.prompt(len(imgs), question) for imgs, question in batch]
        images = [list(imgs) for imgs, _ in batch] if pixels else []
        # Threads share the processor: no call changes its state (the split picks a copy; padding asked every call).
        processor = self._processor_for(self.options.split if split is None else split)
        return processor(text=texts, images=images if any(images) else None, return_tensors="pt",
                         padding=True).to(self.device)

    def _processor_for(self, split: bool):
        """The processor, or a copy splitting the other way (Idefics2 expands image tokens from the attribute)."""
        if getattr(self.processor.image_processor, "do_image_splitting", split) == split:
            return self.processor
        copies = self.__dict__.setdefault("_split_processors", {})
        processor = copies.get(split)
        if processor is None:  # two threads may both make one: equal copies, either will do
            import copy

            processor = copy.copy(self.processor)
            processor.image_processor = copy.copy(self.processor.image_processor)
            processor.image_processor.do_image_splitting = split
            copies[split] = processor
        return processor

    def prepare(self, batch: list[tuple[list, str]], split: bool | None = None, collect: bool = False):
        """Token ids with a `"vision"` entry (vision.py) instead of pixels, built now with `collect` and always for a
        sized family (its prompts follow the grids)."""
        split, processor, sized = self.options.split if split is None else split, self.processor, self.family.sized
        vision = VisionInputs([images for images, _ in batch], split, self.family.image_kwargs)
        if collect or sized:
            vision.collect(processor.image_processor)
        if sized:
            inputs = self.tokenize([self.prompt(len(images), question) for images, question in batch], vision)
        else:
            inputs = self.build_inputs(batch, split, pixels=False)
        inputs["vision"] = vision
        return inputs

    @property
    def render_side(self) -> int | None:
        """The longest side pages are rendered at for this model (None: the documents' default)."""
        if not self.family.sized:
            return None
        return int((getattr(self.processor.image_processor, "size", None) or {}).get("longest_edge") or 0) or None

    def fit_context(self, tokens: int, max_new_tokens: int, what: str, hint: str) -> None:
        """The one context check: `tokens` + `max_new_tokens` over the model's context is a UsageError."""
        if self.context_size and tokens + max_new_tokens > self.context_size:
            raise UsageError(f"{what} needs {tokens} prompt tokens + {max_new_tokens} new tokens, more than the "
                             f"model's context of {self.context_size}", hint)

    def _token_ids(self, texts: list[str], grids: list[tuple[int, int]], **kwargs):
        """The processor's token ids of `texts`; a sized family's image tokens expanded for `grids` [(rows, cols)]."""
        if not self.family.sized:
            return self.processor(text=texts, **kwargs)
        return self.processor.tokenizer(self.family.expand(self.processor, texts, grids) if grids else texts, **kwargs)

    def tokenize(self, texts: list[str], vision, max_new_tokens: int | None = None, what: str = "the prompt",
                 hint: str = "narrow --pages, or --no-split"):
        """Token ids of `texts` (left-padded, on the device; refused over the context), images from `vision`'s grids."""
        inputs = self._token_ids(texts, [g for row in vision.grids for g in row], return_tensors="pt", padding=True)
        self.fit_context(int(inputs["attention_mask"].sum(dim=1).max()),
                         self.options.max_new_tokens if max_new_tokens is None else max_new_tokens, what, hint)
        return inputs.to(self.device)


class LocalEngine(Preparer):
    """A loaded processor + model pair and what is known about it."""

    def __init__(self, processor, model, options: ModelOptions, device: str, dtype, load_s: float, quant_reason: str,
                 quant: str):
        super().__init__(processor, options, device)
        self.model, self.dtype, self.load_s = model, dtype, load_s
        self.quant, self.quant_reason = quant, quant_reason  # families.chosen_quant: a saved quantization as saved
        tokenizer = processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        self.doctags = DOCTAG in tokenizer.get_added_vocab()  # a document model: its DocTags are kept in answers
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.context_size = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.vision_chunk: int | None = None  # images per vision call; None: vision.auto_chunk
        self.prefill_chunk = int(os.environ.get(PREFILL_CHUNK_ENV) or PREFILL_CHUNK)  # tokens; 0: whole prompts
        self.text_lock = threading.Lock()  # the tokenizer is shared by the server's request threads

    @property
    def info(self) -> dict:
        return {"id": self.options.model, "revision": self.options.revision,
                "quantization": QUANT_NAMES[self.quant], "quantization_reason": self.quant_reason,
                "dtype": str(self.dtype).replace("torch.", ""), "device": self.device, "family": self.family.name}

    def prompt_tokens(self, n_images: int, question: str) -> int:
        """Prompt length with the images expanded, without pixels (sized families: one tile an image, the least)."""
        return len(self._token_ids([self.prompt(n_images, question)], [(0, 0)] * n_images).input_ids[0])

    def check_context(self, n_images: int, question: str, max_new_tokens: int) -> int:
        """Refuse up front a prompt that cannot fit the context; returns the prompt length."""
        total = self.prompt_tokens(n_images, question)
        if self.context_size and total + max_new_tokens > self.context_size:
            one = self.prompt_tokens(1, question)
            fit = (self.context_size - max_new_tokens - one) // (self.prompt_tokens(2, question) - one) + 1
            self.fit_context(total, max_new_tokens, f"{n_images} page images",
                             f"at most {max(fit, 0)} pages fit: narrow --pages")
        return total

    def auto_batch_size(self) -> int:
        """Pages decoding together: from free GPU memory on CUDA (about 1.5 GiB a page with split), 8 on CPU."""
        import torch

        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        per_page = (1.5 if self.options.split else 0.4) * 2**30
        return max(1, min(32, int(free * 0.8 // per_page)))

    def chat_inputs(self, messages: list[dict], images: list, max_new_tokens: int):
        """A whole conversation's token ids (refused over the context) and its images for vision.py."""
        text = self.chat_text(messages)
        vision = VisionInputs([list(images)], self.options.split, self.family.image_kwargs)
        if self.family.sized:  # the prompt's image tokens follow the pixels' grids
            vision.collect(self.processor.image_processor)
        inputs = self.tokenize([text], vision, max_new_tokens, "the conversation",
                               "/reset to start over, or show fewer pages")
        inputs["vision"] = vision
        return inputs

    def usage(self, inputs, row: int = 0) -> dict:
        return self._count(inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist())

    @property
    def suppressed_ids(self) -> list[int]:
        """Single-token `bad_words_ids` of the generation config (image tokens): never generated."""
        bad = getattr(self.model.generation_config, "bad_words_ids", None) or []
        return [words[0] for words in bad if len(words) == 1]

    def decode(self, ids: list[int]) -> str:
        with self.text_lock:
            return self.processor.tokenizer.decode(ids, skip_special_tokens=not self.doctags)

    def features(self, inputs) -> list:
        """Image features of each row of `inputs` (None for a row without images), through vision.py."""
        if "pixel_values" in inputs:
            raise TypeError("the engine decodes prepare()'s inputs; build_inputs() is the model card's, for reference")
        return encode(self.model, inputs["vision"], self.vision_chunk or auto_chunk(self.model, self.device),
                      self.processor.image_processor)

    def rows(self, inputs, max_new_tokens: int | None = None, logits_processor=None, schema=None) -> list:
        """A decode-loop `Row` for each row of `prepare`'s (or `chat_inputs`') `inputs`, its images encoded now."""
        from ..structured import row_grammar

        limit = max_new_tokens or self.options.max_new_tokens
        features = self.features(inputs)
        out = []
        for r, feats in enumerate(features):
            ids = inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist()
            out.append(Row(ids, feats, max_tokens=limit, processors=logits_processor or (), tag=r,
                           grammar=row_grammar(self, schema) if schema is not None else None))
        return out

    def generation(self, row) -> Generation:
        """A finished row as a `Generation`; a row that failed raises its error."""
        if row.finish_reason == "error":
            raise generation_error(row.error)
        return Generation(text=row.text, completion_tokens=len(row.token_ids), token_ids=list(row.token_ids),
                          finish_reason=row.finish_reason, total_s=row.total_s,
                          first_token_s=row.total_s if row.first_token_s is None else row.first_token_s,
                          prompt_usage=self._count(row.ids), logprobs=list(row.logprobs), ends=row.token_ends())

    def _count(self, ids: list[int]) -> dict:
        return {"prompt_tokens": len(ids), "image_tokens": sum(1 for t in ids if t == self.image_token_id)}

    def stream_generate(self, inputs, max_new_tokens: int | None = None, logits_processor=None, schema=None):
        """Yield the one-row answer's pieces from the first `next()`; return its `Generation`. Closing stops it."""
        started = time.perf_counter()
        try:
            (row,) = self.rows(inputs, max_new_tokens, logits_processor, schema)
            row.started = started
            yield from stream(Loop(self), row)
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            raise generation_error(exc) from exc
        return self.generation(row)

    def generate(self, inputs, max_new_tokens: int | None = None, logits_processor=None, schema=None) -> Generation:
        """The join of `stream_generate`: the whole answer at once."""
        return self.generate_batch(inputs, max_new_tokens, logits_processor, schema)[0]

    def generate_batch(self, inputs, max_new_tokens: int | None = None, logits_processor=None,
                       schema=None) -> list[Generation]:
        """Every row's answer, the rows decoding together; the first failed row raises its error."""
        try:
            rows = self.rows(inputs, max_new_tokens, logits_processor, schema)
            list(run_rows(Loop(self), rows, len(rows)))
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            raise generation_error(exc) from exc
        return [self.generation(row) for row in rows]

    def generate_rows(self, items, max_new_tokens: int | None = None, schema=None, width: int | None = None):
        """Continuous batching: `items` yields (tag, inputs, row); up to `width` rows decode at once, the next
        item taken as soon as a row ends. Yields (tag, Generation or IdeficsError) as rows end."""
        def rows():
            last, made = None, []
            for tag, inputs, r in items:
                if inputs is not last:  # one prepared batch's images are encoded together, when first needed
                    last, made = inputs, self.rows(inputs, max_new_tokens, None, schema)
                row = made[r]
                row.tag, row.started = tag, time.perf_counter()
                yield row

        for row in run_rows(Loop(self), rows(), width or self.auto_batch_size()):
            try:
                yield row.tag, self.generation(row)
            except IdeficsError as err:
                yield row.tag, err


def generation_error(exc: BaseException) -> IdeficsError:
    if isinstance(exc, IdeficsError):
        return exc
    if is_oom(exc):
        return IdeficsError("out_of_memory", "ran out of memory while generating",
                            "try --no-split, fewer pages or --batch-size 1")
    return IdeficsError("generation_error", f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
