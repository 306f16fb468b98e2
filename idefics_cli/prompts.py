"""Prompts: the chat messages the model sees, and the default prompts of each command.

`user_turn(n_images, text)` is one user message in the transformers chat format, the page images first (the model
card's layout); the processor's own chat template makes the prompt string.
"""

from __future__ import annotations

TRANSCRIBE_PROMPT = (
    "Transcribe all the text on this page, in reading order, as Markdown. Keep tables as Markdown tables. "
    "Output only the transcription."
)


DOCLING_PROMPT = "Convert this page to docling."  # SmolDocling's and granite-docling's own (DocTags answers)


def user_turn(n_images: int, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}
