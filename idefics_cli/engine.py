"""The engine: a loaded processor + model pair that builds inputs and streams greedy answers.

Contract:
- `Engine.build_inputs(batch)` turns [(images, question), ...] into processor outputs exactly as
  `processor.apply_chat_template` + `processor(text=..., images=...)` would (left padding for batches; the
  pixels of a batch one row at a time, inputs.py; the pixel mask as bool): the plain path.
  `Engine.prepare(batch)` gives the same token ids, but the images reach the model through vision.py, in
  bounded same-shape chunks encoded when generation starts (what `ask` and `transcribe` use). Both live in
  `Preparer` (processor, options, device), which an `Engine` is: inputs can be prepared before the weights load.
- `Engine.stream_generate(inputs)` is a generator of text pieces as they are generated (greedy, stops at
  `<end_of_utterance>`) whose return value (`StopIteration.value`) is the finished `Generation` (text, token
  counts, finish reason, timing); it changes nothing it is given. `Engine.generate(inputs)` is its join;
  `Engine.generate_batch(inputs)` answers a left-padded batch. All three take `logits_processor`, handed to
  `model.generate` as is (constrained decoding hooks in there): `Engine.grammar_processors(schema)` is that
  list for a `--schema` (structured.for_engine; a remote engine, client.py, answers its own kind). A prompt
  over `prefill_chunk` tokens (1024; IDEFICS_PREFILL_CHUNK) whose images are pre-encoded is prefilled a
  chunk at a time (bounded activations). Generation keeps its keys and values in `kvcache.new_cache` (decode
  steps write them in place; the same answers as transformers' DynamicCache).
- `Engine.ask(documents, question, ...)` is the library's question: it returns the iterable `Response`
  (response.py) built by selection.py, the same answer and JSON object as `idefics ask`.
- Token arithmetic (image tokens per image, context size) is read from the processor and the config,
  never hard-coded, so Idefics3-style processors work too.
torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from queue import Queue
from typing import TYPE_CHECKING

from .errors import IdeficsError, UsageError, is_oom
from .prompts import user_turn

if TYPE_CHECKING:
    from .model import ModelOptions

QUANT_NAMES = {"4bit": "nf4", "8bit": "int8", "none": "none"}
PREFILL_CHUNK, PREFILL_CHUNK_ENV = 1024, "IDEFICS_PREFILL_CHUNK"  # prompt tokens prefilled at a time


@dataclass
class Generation:
    """One finished answer: what `stream_generate` returns and `generate_batch` gives per row."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    total_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)


CPU_BATCH_SIZE = 8  # pages per generate call on the CPU (Engine.auto_batch_size)


class Preparer:
    """The processor half of an engine: model inputs for [(images, question), ...], with or without the weights
    loaded (the transcribe pipeline prepares its first batch while they load)."""

    def __init__(self, processor, options: ModelOptions, device: str):
        self.processor = processor
        self.options = options
        self.device = device

    def prompt(self, n_images: int, question: str) -> str:
        return self.processor.apply_chat_template([user_turn(n_images, question)], add_generation_prompt=True)

    def build_inputs(self, batch: list[tuple[list, str]], split: bool | None = None):
        """Processor outputs for [(images, question), ...]: one user turn each, left-padded, on the device.

        `split` overrides image splitting for this call only (the out-of-memory fallback); no shared state is
        changed, so threads may build inputs at the same time. The pixels of a batch are built one row at a
        time (inputs.py). This is the plain path; `prepare` is what the CLI runs.
        """
        from . import inputs as rows_

        images = [list(imgs) for imgs, _ in batch]
        split = self.options.split if split is None else split
        by_row = len(batch) > 1 and rows_.row_by_row(self.processor)
        inputs = self._processor_call(batch, split, None if by_row or not any(images) else images)
        if by_row:
            inputs.update(rows_.pixels(self.processor.image_processor, images, split))
        elif "pixel_attention_mask" in inputs:  # 0/1 as int64 from the processor: the same mask in 1/8 of the memory
            # through numpy, not torch: a torch op here would start OpenMP workers in the prefetch thread, and a
            # second idle OpenMP team makes libgomp throttle the one that generates (1.25x slower batches)
            import torch

            inputs["pixel_attention_mask"] = torch.from_numpy(inputs["pixel_attention_mask"].numpy().astype(bool))
        return inputs.to(self.device)

    def _processor_call(self, batch, split: bool, images):
        prompts = [self.prompt(len(imgs), question) for imgs, question in batch]
        # Other threads build inputs at the same time (the prefetch thread, the main thread's no-split fallback), so
        # no call changes what the processor keeps between calls: the split picks a processor, and padding is asked
        # for on every call (one row: no pad), since a fast tokenizer keeps its padding setting from the last call.
        return self._processor_for(split)(text=prompts, images=images, return_tensors="pt", padding=True)

    def _processor_for(self, split: bool):
        """The loaded processor, or for the other image splitting a copy of it whose image processor splits that way.

        A per-call `do_image_splitting=` is not enough: Idefics2's processor expands each image's tokens in the
        text from its image processor's attribute. Neither processor is changed once made.
        """
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
        """The processor's token ids; the images go to the model through vision.py (same-shape chunks, no padding)."""
        from .vision import prepare

        return prepare(self, batch, self.options.split if split is None else split, collect)


class Engine(Preparer):
    """A loaded processor + model pair and what is known about it."""

    def __init__(self, processor, model, options: ModelOptions, device: str, dtype, load_s: float):
        super().__init__(processor, options, device)
        self.model = model
        self.dtype = dtype
        self.load_s = load_s
        tokenizer = processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        self.eos_ids = set(self._eos_ids())
        self.context_size = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.vision_chunk: int | None = None  # images per vision call; None: vision.auto_chunk
        self.prefill_chunk = int(os.environ.get(PREFILL_CHUNK_ENV) or PREFILL_CHUNK)  # tokens; 0: whole prompts

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def info(self) -> dict:
        return {"id": self.options.model, "revision": self.options.revision,
                "quantization": QUANT_NAMES[self.options.quant], "dtype": str(self.dtype).replace("torch.", ""),
                "device": self.device}

    # ---- inputs --------------------------------------------------------------------------------
    def prompt_tokens(self, n_images: int, question: str) -> int:
        """Exact prompt length in tokens with the images expanded, computed without any pixels."""
        return len(self.processor(text=[self.prompt(n_images, question)]).input_ids[0])

    def check_context(self, n_images: int, question: str, max_new_tokens: int) -> int:
        """Refuse up front a prompt that cannot fit the context; returns the prompt length."""
        total = self.prompt_tokens(n_images, question)
        if self.context_size and total + max_new_tokens > self.context_size:
            one = self.prompt_tokens(1, question)
            fit = (self.context_size - max_new_tokens - one) // (self.prompt_tokens(2, question) - one) + 1
            raise UsageError(f"{n_images} page images need {total} prompt tokens + {max_new_tokens} new tokens, more "
                             f"than the model's context of {self.context_size}",
                             f"at most {max(fit, 0)} pages fit: narrow --pages")
        return total

    def model_kwargs(self, inputs) -> dict:
        """generate() kwargs for `inputs`: a `prepare`d entry's images encoded chunk by chunk (vision.py)."""
        from .vision import auto_chunk, model_kwargs

        chunk = self.vision_chunk or auto_chunk(self.model, self.device)
        return model_kwargs(self.model, inputs, chunk, self.processor.image_processor)

    def auto_batch_size(self) -> int:
        """Pages per generate call: from free GPU memory on CUDA (about 1.5 GiB a page with split), 8 on CPU.

        On the CPU a 4-bit decode step costs about the same for 1 or 8 rows (the weights are dequantized once a
        step), so 8 pages a call transcribe faster than 4 (bench/transcribe.py).
        """
        import torch

        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        per_page = (1.5 if self.options.split else 0.4) * 2**30
        return max(1, min(32, int(free * 0.8 // per_page)))

    def usage(self, inputs, row: int = 0) -> dict:
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        return {"prompt_tokens": int(ids.numel()), "image_tokens": int((ids == self.image_token_id).sum())}

    # ---- generation ----------------------------------------------------------------------------
    def grammar_processors(self, schema) -> list:
        """The logits processors that constrain one generate call to `schema` (structured.Schema)."""
        from .structured import for_engine

        return for_engine(self, schema)

    def _gen_kwargs(self, max_new_tokens: int | None, logits_processor=None) -> dict:
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens or self.options.max_new_tokens}
        if logits_processor is not None:
            kwargs["logits_processor"] = logits_processor
        return kwargs

    def _generate_kwargs(self, inputs) -> dict:
        """`model_kwargs(inputs)`, a new in-place key/value cache (kvcache.py), plus chunked prefill for a long
        prompt whose images are already encoded.

        A prompt longer than `prefill_chunk` tokens (many pages in one question) is prefilled `prefill_chunk`
        tokens at a time (transformers' `prefill_chunk_size`), so the prefill's activations stay those of one
        chunk: `ask` over 24 pages of the mid model peaked 293 MiB lower. Shorter prompts (a page, a batch of
        pages) are prefilled whole, as before. IDEFICS_PREFILL_CHUNK=N sets it; 0 turns it off.
        """
        from .kvcache import new_cache

        kwargs = self.model_kwargs(inputs)
        kwargs["cache"] = new_cache(self.model.config)  # in-place decode steps (kvcache.py), same outputs
        chunk = self.prefill_chunk
        if chunk and "pixel_values" not in kwargs and kwargs["input_ids"].shape[1] > chunk:
            kwargs["prefill_chunk_size"] = chunk
        return kwargs

    def stream_generate(self, inputs, max_new_tokens: int | None = None, logits_processor=None):
        """Yield text pieces of the greedy answer while it is generated (batch of one); return the `Generation`.

        Generation starts at the first `next()`; closing the generator (or an exception in the consumer, Ctrl-C)
        stops it within a token.
        """
        import torch
        from transformers.generation.streamers import BaseStreamer

        token_ids: list[int] = []
        first_token_s = None
        pieces: Queue = Queue()
        stop = threading.Event()
        tokenizer = self.processor.tokenizer
        start = time.perf_counter()

        class _Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                token_ids.extend(int(t) for t in value.reshape(-1).tolist())
                pieces.put(("tokens", None))

            def end(self):
                pass

        class _Stop:
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        from transformers import StoppingCriteriaList

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**self._generate_kwargs(inputs),
                                        **self._gen_kwargs(max_new_tokens, logits_processor), streamer=_Streamer(),
                                        stopping_criteria=StoppingCriteriaList([_Stop()]))
                pieces.put(("done", None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                pieces.put(("error", exc))

        thread = threading.Thread(target=run, name="idefics-generate", daemon=True)
        thread.start()
        emitted = ""
        try:
            while True:
                kind, payload = pieces.get()
                if kind == "error":
                    raise generation_error(payload)
                text = tokenizer.decode(self._answer_ids(token_ids), skip_special_tokens=True)
                if kind == "done":
                    new = text[len(emitted):] if text.startswith(emitted) else text
                    if new:
                        yield new
                    emitted = text
                    break
                if text.endswith("\ufffd") or not text.startswith(emitted):
                    continue  # an unfinished multi-byte character: wait for the next token
                if len(text) > len(emitted):
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - start
                    yield text[len(emitted):]
                    emitted = text
        finally:
            stop.set()
            thread.join()
        total_s = time.perf_counter() - start
        return Generation(text=emitted, completion_tokens=len(token_ids), token_ids=token_ids,
                          finish_reason="stop" if token_ids and token_ids[-1] in self.eos_ids else "length",
                          first_token_s=total_s if first_token_s is None else first_token_s, total_s=total_s)

    def _answer_ids(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.eos_ids]

    def generate(self, inputs, max_new_tokens: int | None = None, logits_processor=None) -> Generation:
        """The join of `stream_generate`: the whole greedy answer at once."""
        stream = self.stream_generate(inputs, max_new_tokens, logits_processor)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def generate_batch(self, inputs, max_new_tokens: int | None = None, logits_processor=None) -> list[Generation]:
        """Greedy answers for a left-padded batch (no streaming)."""
        import torch

        kwargs = self._gen_kwargs(max_new_tokens, logits_processor)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model.generate(**self._generate_kwargs(inputs), **kwargs)
        except Exception as exc:
            raise generation_error(exc) from exc
        elapsed = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for ids in new:
            ended = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
            ids = ids[: ended + 1] if ended is not None else ids
            text = self.processor.tokenizer.decode(self._answer_ids(ids), skip_special_tokens=True)
            results.append(Generation(text=text, completion_tokens=len(ids), token_ids=ids, total_s=elapsed,
                                      first_token_s=None, finish_reason="stop" if ended is not None else "length"))
        return results

    # ---- the library's question ----------------------------------------------------------------
    def ask(self, documents, question: str, *, pages: str | None = None, password: str | None = None,
            dpi: int | None = None, max_new_tokens: int | None = None, logits_processor=None, schema=None):
        """Ask `question` about the chosen pages of `documents`; returns the streaming `Response`.

        `schema`: a JSON Schema (a dict) or a string as `--schema` takes (a file, inline JSON, the concise
        syntax): the answer is constrained to it and `Response.data` is the parsed value (structured.py).

        `documents`: paths (a str or a list of them, "-" for stdin), or a `Selection` already opened with
        `idefics_cli.open_pages` (then `pages`, `password` and `dpi` were given there). Input errors, a prompt
        over the context and an empty question raise `IdeficsError` here, before anything is generated;
        generation starts when the answer is first read.
        """
        from .selection import Selection, ask, open_pages

        if schema is not None:  # structured.py (and its grammar engine) only for a schema
            from .structured import as_schema

            schema = as_schema(schema)
        if isinstance(documents, Selection):
            if (pages, password, dpi) != (None, None, None):
                raise UsageError("pages, password and dpi are options of open_pages when documents is a Selection")
            return ask(self, documents, question, max_new_tokens, logits_processor, schema=schema)
        selection = open_pages(documents, pages, password=password, dpi=dpi)
        try:
            return ask(self, selection, question, max_new_tokens, logits_processor, close=True, schema=schema)
        except BaseException:
            selection.close()
            raise

    # ---- transcription ---------------------------------------------------------------------------
    def transcribe(self, inputs, out: str | None = None, **request_fields):
        """Transcribe files, folders or globs with this engine, as `idefics transcribe` does.

        Returns a `Transcription` (transcription.py): iterate it for each page's `PageRecord` (`path`, `page`,
        `status`, `text`, ...) as it is written; `out` (a .jsonl file or a folder) gets the same records and
        files as the CLI's `--out` and is resumed the same way; its `summary` and `exit_status` are known
        afterwards. `request_fields` are `TranscribeRequest`'s (prompt, pages, dpi, password, batch_size,
        force, shard, schema); the model options are this engine's.
        """
        from .transcription import TranscribeRequest, Transcription

        return Transcription(TranscribeRequest(inputs, out, self.options, **request_fields), engine=self)


def generation_error(exc: BaseException) -> IdeficsError:
    if isinstance(exc, IdeficsError):
        return exc
    if is_oom(exc):
        return IdeficsError("out_of_memory", "ran out of memory while generating",
                            "try --no-split, fewer pages or --batch-size 1")
    return IdeficsError("generation_error", f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
