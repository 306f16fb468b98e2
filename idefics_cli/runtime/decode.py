"""The one decode loop: prompts join as rows, advance one token a step together, and leave when they end.

`Row`: one answer (ids, image `features` or a cached `prefix`) with its own stops, UTF-8 holdback, grammar, sampling,
processors and cancel; `text` is its stable text, `finish_reason` (stop, length, cancelled, error) set at its end.
`Loop(engine)`: `add(rows)` prefills, `step()` advances every row a token; `stream` and `run_rows` drive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from ..errors import IdeficsError, classify
from .kvcache import KV, KVBatch, prefill

_TINY = 1.1754943508222875e-38  # the smallest normal float32: the least temperature logits are divided by


class Row:
    """One answer being generated; per token: `logprobs` (masked, at its temperature, before top-p), `ends`, `top`."""

    def __init__(self, ids: list[int], features=None, prefix: KV | None = None, *, max_tokens: int,
                 stop: Iterable[str] = (), grammar=None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, processors: Iterable[Callable] = (), keep_prefix: int = 0, tag=None,
                 top_n: int = 0):
        self.ids, self.features, self.prefix = list(ids), features, prefix
        self.max_tokens, self.stop, self.grammar = max_tokens, list(stop), grammar
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.processors = list(processors)
        self.keep_prefix = keep_prefix  # add() keeps the first keep_prefix positions' KV as `prefix_kv`
        self.prefix_kv: KV | None = None
        self.tag = tag
        self.cancelled = threading.Event()
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ends: list[int] = []
        self.top_n, self.top = top_n, []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: IdeficsError | None = None
        self.started, self.first_token_s, self.total_s = time.perf_counter(), None, 0.0
        self._generator = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled.set()

    def on_start(self) -> None:
        """The prompt is prefilled; the first token comes next (override)."""

    def on_text(self, piece: str) -> None:
        """A new stable piece of the answer (override or wrap)."""

    def on_end(self) -> None:
        """The row ended: `finish_reason` is set (override or wrap)."""

    def finish(self, reason: str, error: IdeficsError | None = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        self.total_s = time.perf_counter() - self.started
        self.features = self.prefix = None
        self.on_end()

    def fail(self, exc: BaseException) -> None:
        self.finish("error", classify(exc))

    def _accept(self, token: int, eos: set, decode) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        if self.grammar is not None:
            self.grammar.accept(token)
        self.token_ids.append(token)
        ended = "stop" if token in eos else None  # an end token ends the row: token_ids is the answer until then
        text = self.text if ended else decode(self.token_ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, ended = text[:at], "stop"
        self.ends.append(max(len(text.rstrip("\ufffd")), self.ends[-1] if self.ends else 0))
        if ended is None and len(self.token_ids) >= self.max_tokens:
            ended = "length"
        stable = text
        if ended is None:
            if text.endswith("\ufffd"):
                return
            hold = max((len(s) - 1 for s in self.stop), default=0)
            stable = text[: max(0, len(text) - hold)]
        if len(stable) > len(self.text) and stable.startswith(self.text):
            piece, self.text = stable[len(self.text):], stable
            self.on_text(piece)
        elif ended is not None:
            self.text = stable
        if ended is not None:
            self.finish(ended)

    def token_ends(self) -> list[int]:
        """Where each token's part of `text` ends (a token inside a character, or cut by a stop, adds nothing)."""
        n = len(self.text)
        return [min(e, n) for e in self.ends]


class Loop:
    """The running rows of one engine and their key/value batch."""

    _confidence = True  # off only in bench/confidence.py: the per-token log-probabilities' cost

    def __init__(self, engine):
        self.engine = engine
        self.rows: list[Row] = []
        self.batch = KVBatch(engine.model)
        self.eos = set(engine.eos_ids)
        self.suppressed = engine.suppressed_ids
        self.steps = 0

    def add(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows` and take their first tokens; the rows that go on join the batch. Returns the rows that
        ended meanwhile (prefill failed for this group only; a batch that cannot grow fails every row)."""
        ended = [row for row in rows if self._ended(row)]
        rows = [row for row in rows if not row.done]
        groups: dict[int, list[Row]] = {}
        for row in rows:  # prompts of one length (and no cached prefix) are prefilled together
            groups.setdefault(-1 - len(groups) if row.prefix is not None else len(row.ids), []).append(row)
        for group in groups.values():
            try:
                logits, kvs = prefill(self.engine, group)
            except BaseException as exc:  # noqa: BLE001 - fails this group only
                if isinstance(exc, KeyboardInterrupt):
                    raise
                for row in group:
                    row.fail(exc)
                ended += group
                continue
            joining = []
            for row, kv, row_logits in zip(group, kvs, self._choose(logits, group)):
                if row.keep_prefix:
                    row.prefix_kv = kv.head(row.keep_prefix)
                row.features = row.prefix = None
                row.on_start()
                self._take(row, row_logits)
                if row.done:
                    ended.append(row)
                else:
                    joining.append((row, kv))
            try:
                self.batch.add([kv for _, kv in joining])
            except BaseException as exc:  # e.g. out of memory halfway: the batch is no longer whole
                ended += self.fail_all(exc, [*self.rows, *(r for r, _ in joining)])
                continue
            self.rows.extend(row for row, _ in joining)
        return ended

    def step(self) -> list[Row]:
        """One token for every running row; returns the rows that ended (they have left the batch)."""
        ended = self._retire()
        if not self.rows:
            return ended
        rows = list(self.rows)
        try:
            logits = self.batch.step([row.token_ids[-1] for row in rows])
            chosen = self._choose(logits, rows)
        except BaseException as exc:  # noqa: BLE001
            return ended + self.fail_all(exc, rows)
        self.steps += 1
        for row, token in zip(rows, chosen):
            self._take(row, token)
        return ended + self._retire()

    def close(self) -> None:
        """Cancel every running row and free the batch."""
        for row in self.rows:
            row.finish("cancelled")
        self.rows, self.batch = [], KVBatch(self.engine.model)

    def fail_all(self, exc: BaseException, rows: list[Row] | None = None) -> list[Row]:
        """A forward pass failed: its rows (default: every running row) fail, the batch starts empty; Ctrl-C goes on."""
        rows = list(self.rows) if rows is None else rows
        for row in rows:
            row.fail(exc)
        self.rows, self.batch = [], KVBatch(self.engine.model)
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        return rows

    def _ended(self, row: Row) -> bool:
        if row.cancelled.is_set():
            row.finish("cancelled")
        return row.done

    def _take(self, row: Row, token) -> None:
        if isinstance(token, BaseException):
            row.fail(token)
            return
        try:
            row._accept(token, self.eos, self.engine.decode)
        except BaseException as exc:  # noqa: BLE001 - this row only
            if isinstance(exc, KeyboardInterrupt):
                raise
            row.fail(exc)

    def _retire(self) -> list[Row]:
        ended = [row for row in self.rows if self._ended(row)]
        if ended:
            keep = [k for k, row in enumerate(self.rows) if not row.done]
            self.batch.keep(keep)
            self.rows = [self.rows[k] for k in keep]
        return ended

    def _choose(self, logits, rows: list[Row]) -> list:
        """The next token of each row (or the exception its own processing raised)."""
        import torch

        with torch.inference_mode():
            if self.suppressed:
                logits[:, self.suppressed] = float("-inf")
            chosen: list = [None] * len(rows)
            for k, row in enumerate(rows):
                if row.processors:
                    try:
                        ids = torch.tensor([row.ids + row.token_ids], device=logits.device)
                        scores = logits[k:k + 1]
                        for processor in row.processors:
                            scores = processor(ids, scores)
                        logits[k] = scores[0]
                    except Exception as exc:  # noqa: BLE001
                        chosen[k] = exc
            if any(row.grammar is not None for row in rows):
                from ..structured import mask_rows

                mask_rows(logits, [row.grammar for row in rows])
            for k, row in enumerate(rows):
                if chosen[k] is None:
                    try:
                        chosen[k] = _pick(logits[k], row)
                    except Exception as exc:  # noqa: BLE001 - one row's sampling failing fails that row, not the loop
                        chosen[k] = exc
            if self._confidence:
                _score(logits, rows, chosen)
            return chosen


def _score(logits, rows: list[Row], chosen: list) -> None:
    """Each row's chosen token's log-probability (one gather and logsumexp for the batch), and its top_n."""
    import torch

    ok = [k for k, token in enumerate(chosen) if not isinstance(token, BaseException)]
    if not ok:
        return
    x = logits if len(ok) == len(rows) else logits[ok]
    scale = [rows[k].temperature or 1.0 for k in ok]
    if any(t != 1.0 for t in scale):  # shifted to a max of 0 first: a tiny temperature cannot overflow to inf
        scale = torch.tensor(scale, device=x.device)[:, None]
        shift = torch.where(scale != 1.0, x.max(-1, keepdim=True).values, 0.0)
        x = (x - shift) / scale.clamp(min=_TINY)
    lse = torch.logsumexp(x, -1)
    picked = x.gather(1, torch.tensor([chosen[k] for k in ok], device=x.device)[:, None])[:, 0] - lse
    for j, (k, value) in enumerate(zip(ok, picked.tolist())):
        row = rows[k]
        row.logprobs.append(value)
        if row.top_n:
            values, ids = torch.topk(x[j], row.top_n)
            row.top.append(list(zip(ids.tolist(), (values - lse[j]).tolist())))


def _pick(logits, row: Row) -> int:
    """Greedy (argmax) or, with a temperature, top-p sampling from the row's seeded generator (a temperature too
    small for float32 is greedy's limit: the logits are shifted to a max of 0 before they are divided)."""
    import torch

    if not row.temperature:
        return int(logits.argmax())
    if row._generator is None:
        row._generator = torch.Generator(device="cpu")
        row._generator.manual_seed(row.seed if row.seed is not None else int(torch.seed()))
    logits = logits.cpu()
    probs = torch.softmax((logits - logits.max()) / max(row.temperature, _TINY), dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs > row.top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row._generator))


def stream(loop: Loop, row: Row) -> Iterator[str]:
    """Run `row` alone to its end, yielding each new piece of its text; closing the generator cancels it."""
    pieces: list[str] = []
    row.on_text = pieces.append
    try:
        loop.add([row])
        while True:
            yield from pieces
            pieces.clear()
            if row.done:
                break
            loop.step()
    finally:
        loop.close()  # a row still running (the consumer stopped reading) ends as cancelled
    return row


def run_rows(loop: Loop, rows: Iterable[Row], width: int) -> Iterator[Row]:
    """Keep up to `width` rows running, taking the next of `rows` whenever a place is free; yield rows as they end."""
    pending, more = iter(rows), True
    try:
        while True:
            room = max(1, width) - len(loop.rows)
            joining = list(islice(pending, room)) if more else []
            more = more and len(joining) == room
            yield from loop.add(joining)
            if loop.rows:
                yield from loop.step()
            elif not more:
                return
    finally:
        loop.close()
