"""Confidence: how sure the model was of an answer, from its tokens' log-probabilities (docs/formats.md).

Contract: token i wrote `text[ends[i-1]:ends[i]]`. `summary(logprobs, ends)` is {"mean_logprob", "min_prob",
"min_at"} (None without tokens); `fields(text, logprobs, ends)` mirrors the JSON value in `text` with each leaf's
lowest token probability; `spans(text)` with each leaf's (start, end); `lowest(value)` is the smallest leaf.
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from json.decoder import scanstring

DIGITS = 6  # decimals kept in the JSON


def summary(logprobs: list[float], ends: list[int]) -> dict | None:
    if not logprobs or len(logprobs) != len(ends):
        return None
    low = min(range(len(logprobs)), key=logprobs.__getitem__)
    return {"mean_logprob": round(math.fsum(logprobs) / len(logprobs), DIGITS),
            "min_prob": round(math.exp(logprobs[low]), DIGITS), "min_at": ends[low - 1] if low else 0}


def fields(text: str, logprobs: list[float], ends: list[int]):
    """The mirror of the JSON value in `text` with each leaf's lowest token probability (None: no tokens)."""
    if not logprobs or len(logprobs) != len(ends):
        return None
    starts = [0, *ends[:-1]]
    reach = [max(e, s + 1) for s, e in zip(starts, ends)]  # a token that wrote nothing counts where it stands

    def leaf(span):
        lo, hi = bisect_right(reach, span[0]), bisect_left(starts, span[1])
        return round(math.exp(min(logprobs[lo:hi])), DIGITS) if hi > lo else None

    value = spans(text)
    return None if value is None else _walk(value, leaf)


def lowest(value) -> float | None:
    found: list[float] = []
    _walk(value, lambda leaf: found.append(leaf) if leaf is not None else None)
    return min(found, default=None)


def _walk(value, leaf):
    """`value` with `leaf(x)` in place of each leaf x (objects and arrays kept)."""
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, leaf) for v in value]
    return leaf(value)


# ---- a JSON scanner that keeps each leaf's span (the standard library's gives none) -------------------------
_SPACE = " \t\n\r"
_LITERALS = ("true", "false", "null")


def spans(text: str):
    """The JSON value in `text` with each leaf replaced by its (start, end) span; None if it is not JSON."""
    try:
        value, at = _value(text, _skip(text, 0))
    except (IndexError, ValueError):
        return None
    return value if _skip(text, at) == len(text) else None


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _SPACE:
        at += 1
    return at


def _value(text: str, at: int):
    c = text[at]
    if c == "{":
        out, at = {}, _skip(text, at + 1)
        while text[at] != "}":
            if text[at] != '"':
                raise ValueError(at)
            key, at = scanstring(text, at + 1)
            at = _skip(text, at)
            if text[at] != ":":
                raise ValueError(at)
            out[key], at = _value(text, _skip(text, at + 1))
            at = _after(text, at, "}")
        return out, at + 1
    if c == "[":
        out, at = [], _skip(text, at + 1)
        while text[at] != "]":
            item, at = _value(text, at)
            out.append(item)
            at = _after(text, at, "]")
        return out, at + 1
    if c == '"':
        end = scanstring(text, at + 1)[1]
        return (at, end), end
    end = at
    while end < len(text) and text[end] not in _SPACE + ",:]}":
        end += 1
    word = text[at:end]
    if word not in _LITERALS:
        float(word)  # ValueError when it is no number
    return (at, end), end


def _after(text: str, at: int, close: str) -> int:
    """Past the `,` after an item (to the next item) or at the closing bracket."""
    at = _skip(text, at)
    if text[at] == ",":
        return _skip(text, at + 1)
    if text[at] != close:
        raise ValueError(at)
    return at
