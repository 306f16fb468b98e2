"""Prompts: the chat messages the model sees, and the default prompts of each command.

Contract: `user_turn(n_images, text)` is one user message in the transformers chat format with the page
images first, then the text (the idefics2-8b model card's layout). The processor's own chat template
turns messages into the prompt string; nothing here formats tokens by hand.
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
