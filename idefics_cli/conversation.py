"""Conversation: a multi-turn chat about page images, formatted by the processor's own chat template.

Contract: a `Conversation` holds messages in the transformers chat format ([user turn with page images +
q1, assistant a1, user q2, ...]) and the page images in the order their `{"type": "image"}` entries appear.
`attach(pages)` queues rendered pages for the next user turn (the first question carries the chosen
pages; `/pages` attaches new ones to the next question, earlier turns keep theirs). `inputs(question)`
returns exactly `processor(text=processor.apply_chat_template(messages + [user turn],
add_generation_prompt=True), images=[all images])`, on the model's device. `commit(question, answer)`
appends the turn; a failed turn is not committed, an interrupted one is, with what was answered so far and
`"interrupted": true` on the assistant message (the chat template reads only role and content).
`to_dict()` is the `/save` file (schema `idefics-cli.chat/1`): the messages, plus `sources` naming the
document pages of each image-bearing message. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError
from .prompts import assistant_turn, user_turn

CHAT_SCHEMA = "idefics-cli.chat/1"


@dataclass
class PageImage:
    path: str
    page: int
    image: object  # PIL.Image.Image


@dataclass
class Conversation:
    engine: object
    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    pending: list[PageImage] = field(default_factory=list)

    @property
    def turn(self) -> int:
        """How many questions were answered in this conversation."""
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def attach(self, pages: list[PageImage]) -> None:
        """Show these pages with the next question (replacing pages queued and not yet asked about)."""
        self.pending = list(pages)

    def reset(self, pages: list[PageImage]) -> None:
        self.messages, self.images, self.sources = [], [], []
        self.attach(pages)

    def next_messages(self, question: str) -> list[dict]:
        return [*self.messages, user_turn(len(self.pending), question)]

    def prompt(self, question: str) -> str:
        return self.engine.processor.apply_chat_template(self.next_messages(question), add_generation_prompt=True)

    def inputs(self, question: str, max_new_tokens: int):
        """Processor outputs for the whole conversation plus `question`, refused if over the context."""
        images = self.images + [p.image for p in self.pending]
        processor = self.engine.processor
        inputs = processor(text=[self.prompt(question)], images=[images] if images else None, return_tensors="pt")
        total = int(inputs["input_ids"].shape[1])
        context = getattr(self.engine, "context_size", None)
        if context and total + max_new_tokens > context:
            raise UsageError(f"the conversation needs {total} prompt tokens + {max_new_tokens} new tokens, more than "
                             f"the model's context of {context}", "/reset to start over, or show fewer pages")
        return inputs.to(self.engine.model.device)

    def commit(self, question: str, answer: str, interrupted: bool = False) -> None:
        """Append a turn; an answer stopped by Ctrl-C is kept as far as it went, marked `"interrupted": true`."""
        index = len(self.messages)
        reply = assistant_turn(answer)
        if interrupted:
            reply["interrupted"] = True
        self.messages.extend([user_turn(len(self.pending), question), reply])
        for p in self.pending:
            if self.sources and self.sources[-1]["message"] == index and self.sources[-1]["path"] == p.path:
                self.sources[-1]["pages"].append(p.page)
            else:
                self.sources.append({"message": index, "path": p.path, "pages": [p.page]})
        self.images.extend(p.image for p in self.pending)
        self.pending = []

    def seen(self) -> list[dict]:
        """Every document page the model sees in the next turn: [{"path", "pages"}], merged per document."""
        merged: list[dict] = []
        for path, page in [(s["path"], p) for s in self.sources for p in s["pages"]] + [
                (p.path, p.page) for p in self.pending]:
            if merged and merged[-1]["path"] == path:
                if page not in merged[-1]["pages"]:
                    merged[-1]["pages"].append(page)
            else:
                merged.append({"path": path, "pages": [page]})
        return merged

    def to_dict(self) -> dict:
        return {"schema": CHAT_SCHEMA, "model": self.engine.info, "split": self.engine.options.split,
                "messages": self.messages, "sources": self.sources}
