"""The grammar engine behind `--schema` (llguidance): JSON Schema -> grammar, tokenizer view, per-row masks.

`grammar_text(schema)`: the grammar (compact JSON, closed objects; UsageError if unbuildable), no tokenizer or torch.
`tokenizer_view(...)` is built once per process; `Compiled.of(schema, ...)` a grammar for one view; `RowGrammar` one
decode-loop row's state; `mask_rows(logits, rows)` masks every live row in place with one llguidance call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

SEPARATORS = (", ", ": ")  # item and key separators of the answer (json.dumps's); no other whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
INSTALL_HINT = "llguidance and jsonschema come with idefics-cli; reinstall them: pip install llguidance jsonschema"
_SUBSCHEMA = {"additionalProperties", "items", "not"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SUBSCHEMA_LISTS = {"anyOf", "allOf", "oneOf", "prefixItems"}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UsageError("llguidance is not installed", INSTALL_HINT) from None
    return llguidance


def closed(node: Any) -> Any:
    """A copy of the schema `node` with `"additionalProperties": false` on every object schema that lists
    `properties` or `patternProperties` and has no `additionalProperties`."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, sub in node.items():
        if key in _SUBSCHEMA_MAPS and isinstance(sub, dict):
            out[key] = {name: closed(child) for name, child in sub.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(sub, list):
            out[key] = [closed(child) for child in sub]
        elif key in _SUBSCHEMA:
            out[key] = closed(sub)
        else:
            out[key] = sub
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_text(schema: dict) -> str:
    """The llguidance grammar of `schema` (no tokenizer needed); UsageError if it cannot be built."""
    ll = _llguidance()
    text = ll.LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), overrides=JSON_OPTIONS)
    failed, messages = ll.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        message = " ".join(line.strip() for line in messages[0].splitlines() if line.strip())
        raise UsageError(f"--schema cannot be turned into a grammar: {message[:200]}")
    return text


_VIEWS: dict[tuple, Any] = {}


def tokenizer_key(tokenizer, vocab_size: int, stop_ids) -> tuple:
    return (getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, len(tokenizer), vocab_size,
            tuple(sorted(stop_ids)))


def tokenizer_view(tokenizer, vocab_size: int, stop_ids):
    """llguidance's `LLTokenizer` for a Hugging Face tokenizer, once per (tokenizer, width, stops). A sentencepiece
    vocabulary with byte fallback is read from its pieces (`_Pieces`, faster); others by `llguidance.hf`."""
    key = tokenizer_key(tokenizer, vocab_size, stop_ids)
    if key not in _VIEWS:
        ll = _llguidance()
        stops = sorted(stop_ids)
        vocab = tokenizer.get_vocab()
        if "<0x0A>" in vocab and "\u2581" in vocab:
            pieces = ll.TokenizerWrapper(_Pieces(tokenizer, vocab_size))
            _VIEWS[key] = ll.LLTokenizer(pieces, n_vocab=vocab_size, eos_token=stops)
        else:
            from llguidance.hf import from_tokenizer

            _VIEWS[key] = from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stops)
    return _VIEWS[key]


class _Pieces:
    """What `llguidance.TokenizerWrapper` reads from a sentencepiece tokenizer: each token's bytes (`▁` is a
    space, `<0xNN>` a byte, a special token its name after llguidance's 0xFF marker), and text -> ids."""

    def __init__(self, tokenizer, vocab_size: int):
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
        self.tokens = []
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in special:
                self.tokens.append(b"\xff" + piece.encode())
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens += [b""] * (vocab_size - len(self.tokens))
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self.tokenizer = tokenizer
        self.skip = len(tokenizer.encode("\x02", add_special_tokens=False))  # sentencepiece's leading "▁"

    def __call__(self, text) -> list[int]:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return self.tokenizer.encode("\x02" + text, add_special_tokens=False)[self.skip:]


@dataclass(frozen=True)
class Compiled:
    """A schema's grammar for one tokenizer view."""

    grammar: str
    view: Any  # the llguidance.LLTokenizer it is for
    width: int  # mask width: the model's vocabulary size
    stop_ids: frozenset
    prototype: Any  # an llguidance.LLMatcher at the start of the grammar

    @classmethod
    def of(cls, schema: dict, tokenizer, vocab_size: int, stop_ids) -> Compiled:
        text, view = grammar_text(schema), tokenizer_view(tokenizer, vocab_size, stop_ids)
        prototype = _llguidance().LLMatcher(view, text, log_level=0)
        if prototype.is_error():
            raise UsageError(f"--schema cannot be turned into a grammar: {prototype.get_error()[:200]}")
        return cls(text, view, vocab_size, frozenset(stop_ids), prototype)

    def matcher(self):
        return self.prototype.deep_copy()


class RowGrammar:
    """One decode-loop row's grammar state: `accept(token)` (RuntimeError outside the grammar), `done`."""

    def __init__(self, compiled: Compiled):
        self.matcher = compiled.matcher()
        self.width = compiled.width
        self.stop_ids = compiled.stop_ids
        self.done = False

    def accept(self, token: int) -> None:
        if self.done:
            return
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"a token outside the grammar was chosen: {self.matcher.get_error()[:200]}")
        self.done = int(token) in self.stop_ids


_EXECUTOR: list = []  # one llguidance.LLExecutor (a thread pool) per process, made on first use


def mask_rows(logits, grammars: list) -> None:
    """Mask `logits` [rows, vocab] in place: each row whose grammar is not None (and not done) gets its mask."""
    import torch

    live = [k for k, g in enumerate(grammars) if g is not None and not g.done]
    if not live:
        return
    width = grammars[live[0]].width
    words = (width + 31) // 32
    bits = torch.full((len(live), words), -1, dtype=torch.int32)
    if not _EXECUTOR:
        _EXECUTOR.append(_llguidance().LLExecutor())
    _EXECUTOR[0].unsafe_compute_mask_ptr([(grammars[k].matcher, i) for i, k in enumerate(live)], bits.data_ptr(),
                                         words * 4, len(live))
    device = logits.device
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits.to(device).unsqueeze(-1) >> shifts) & 1).bool().reshape(len(live), -1)
    n = min(width, logits.shape[1])
    blocked = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # rows without a grammar: none
    rows = torch.tensor(live, device=device)
    blocked[rows, :n] = ~allowed[:, :n]
    blocked[rows, n:] = True  # columns past the grammar's vocabulary
    logits.masked_fill_(blocked, float("-inf"))
