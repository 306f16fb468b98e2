"""Which grammar engine for `--schema`: llguidance (shipped), xgrammar and outlines-core on the idefics2 tokenizer.

    python bench/schema_engines.py [--reps N] [--smoke]

For each engine, in one process and one run (so the ratios compare like with like): whether it compiles the
invoice schema with the idefics2-8b tokenizer (the bundled Mistral-7B-v0.1 vocabulary plus idefics2's three
added tokens; mask width = the model config's vocab size, 32003) on this CPU; the time to build its tokenizer
view (once per process); the grammar compile time for the invoice schema (median of --reps fresh compiles,
caches off where the engine has one); and the per-step cost of constrained decoding at batch 1 and 8: accept
the previous token, fill the next-token mask, apply it to a float32 logits row block. The first row is what
`--schema` runs (idefics_cli/structured.py: llguidance with the tokenizer view read from sentencepiece pieces,
masks of all rows filled by one call, applied in place); then llguidance through its own hf tokenizer route
and per-row calls, and xgrammar twice: row by row (as its transformers processor does) and with its
BatchGrammarMatcher. An engine that is not installed (xgrammar and outlines-core are no dependency of
idefics-cli) gets a row that says so. The token path is one compact JSON instance of the schema (the grammar's
own separators), the same for every engine. Ratios are against the first row, in the same run. The machine's
load average is printed: figures taken on a busy machine are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "invoice_number": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "currency": {"enum": ["USD", "EUR", "GBP"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "description": {"type": "string"}, "quantity": {"type": "integer", "minimum": 0},
            "unit_price": {"type": "number"}}, "required": ["description", "quantity", "unit_price"]}},
        "total": {"type": "number", "minimum": 0},
        "paid": {"type": "boolean"},
    },
    "required": ["vendor", "invoice_number", "total"],
}
INVOICE = {"vendor": "ACME Tools Ltd", "invoice_number": "INV-2024-0042", "date": "2024-03-15", "currency": "EUR",
           "lines": [{"description": "Hammer, steel", "quantity": 2, "unit_price": 12.5},
                     {"description": "Nails (box of 200)", "quantity": 10, "unit_price": 3.99}],
           "total": 64.9, "paid": False}
TEXT = json.dumps(INVOICE)  # separators ", " and ": ": the compact JSON `--schema` decodes


def tokenizer():
    """The idefics2-8b tokenizer as the tests build it, and the mask width of the model config."""
    from transformers.utils import logging

    from idefics_cli.dev import tiny

    logging.set_verbosity_error()
    processor = tiny.build_processor(tempfile.mkdtemp(prefix="schema-bench-"))
    return processor.tokenizer, tiny.config("tiny").text_config.vocab_size


def token_path(tok) -> list[int]:
    """TEXT as token ids, without the sentencepiece word-start mark on the first piece (no leading space)."""
    pieces = tok.tokenize(TEXT)
    if pieces[0].startswith("\u2581"):
        pieces = [*tok.tokenize(pieces[0][1:])[1:], *pieces[1:]] if tok.tokenize(pieces[0][1:])[0] == "\u2581" \
            else [pieces[0][1:], *pieces[1:]]
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.decode(ids) == TEXT, tok.decode(ids)
    return ids


class Shipped:
    """What `--schema` runs: idefics_cli.structured (RowGrammar per row, one mask_rows call per step)."""

    name = "idefics-cli (llguidance)"

    def __init__(self, tok, vocab):
        from idefics_cli import structured as grammar_engine

        self.ge = grammar_engine
        self.args = (tok, vocab, [2, 32002])
        grammar_engine.tokenizer_view(*self.args)

    def compile(self, schema):
        return self.ge.Compiled.of(schema, *self.args)

    def start(self, grammar, batch):
        self.rows = [self.ge.RowGrammar(grammar) for _ in range(batch)]

    def step(self, token, logits):
        if token is not None:
            for row in self.rows:
                row.accept(token)
        self.ge.mask_rows(logits, self.rows)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[2, 32002])
        self.vocab = vocab

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self, grammar, batch):
        self.matchers = [self.xgr.GrammarMatcher(grammar) for _ in range(batch)]
        self.mask = self.xgr.allocate_token_bitmask(batch, self.vocab)

    def step(self, token, logits):
        for i, m in enumerate(self.matchers):
            if token is not None:
                assert m.accept_token(token)
            m.fill_next_token_bitmask(self.mask, i)
        self.xgr.apply_token_bitmask_inplace(logits, self.mask)


class XgrammarBatch(Xgrammar):
    """xgrammar with its BatchGrammarMatcher: one call accepts and fills every row (threads in C++)."""

    name = "xgrammar batch matcher"

    def start(self, grammar, batch):
        super().start(grammar, batch)
        self.batch = self.xgr.BatchGrammarMatcher()

    def step(self, token, logits):
        if token is not None:
            assert all(self.batch.batch_accept_token(self.matchers, [token] * len(self.matchers)))
        self.batch.batch_fill_next_token_bitmask(self.matchers, self.mask)
        self.xgr.apply_token_bitmask_inplace(logits, self.mask)


class Llguidance:
    """llguidance as its own helpers use it: the hf tokenizer route, one fill call per row, its torch apply."""

    name = "llguidance (hf route, per row)"

    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=32002)
        self.vocab = vocab

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def start(self, grammar, batch):
        self.matchers = [self.ll.LLMatcher(self.tok, grammar, log_level=0) for _ in range(batch)]
        self.mask = self.llt.allocate_token_bitmask(batch, self.vocab)

    def step(self, token, logits):
        for i, m in enumerate(self.matchers):
            if token is not None:
                assert m.consume_token(token), m.get_error()
            self.llt.fill_next_token_bitmask(m, self.mask, i)
        self.llt.apply_token_bitmask_inplace(logits, self.mask)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core
        from outlines_core.kernels import torch as kernels

        self.oc = outlines_core
        self.k = kernels
        self.vocab = vocab
        words: dict[str, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i in (0, 1, 2, 32000, 32001, 32002):
                continue
            text = bytes.fromhex(token[3:-1]).decode("latin-1") if token.startswith("<0x") else \
                token.replace("\u2581", " ")
            words.setdefault(text, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(32002, words)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), self.vocabulary)

    def start(self, grammar, batch):
        self.guides = [self.oc.Guide(grammar) for _ in range(batch)]
        self.masks = [self.k.allocate_token_bitmask(self.vocab) for _ in range(batch)]

    def step(self, token, logits):
        for i, g in enumerate(self.guides):
            if token is not None:
                g.advance(token)
            self.k.fill_next_token_bitmask(g, self.masks[i])
            self.k.apply_token_bitmask_inplace(logits[i:i + 1], self.masks[i])


def measure(engine_cls, tok, vocab, path, reps, batches):
    import torch

    row = {"engine": engine_cls.name}
    try:
        t0 = time.perf_counter()
        engine = engine_cls(tok, vocab)
        row["tokenizer_s"] = time.perf_counter() - t0
        compiles = []
        for _ in range(reps):
            t0 = time.perf_counter()
            grammar = engine.compile(INVOICE_SCHEMA)
            compiles.append(time.perf_counter() - t0)
        row["compile_s"] = statistics.median(compiles)
        for batch in batches:
            steps = []
            for _ in range(reps):
                engine.start(grammar, batch)
                logits = torch.zeros(batch, vocab)
                spent = 0.0
                previous = None
                for token in path:
                    logits.zero_()
                    t0 = time.perf_counter()
                    engine.step(previous, logits)
                    spent += time.perf_counter() - t0
                    assert bool(torch.isfinite(logits[:, token]).all()), f"{engine.name} masked a valid token"
                    previous = token
                steps.append(spent / len(path))
            row[f"step_b{batch}_s"] = statistics.median(steps)
        row["runs"] = "yes"
    except ImportError as exc:
        row["runs"] = f"not installed ({exc.name or exc})"
    except Exception as exc:  # noqa: BLE001 - an engine that fails here is a result, not a crash
        row["runs"] = f"no: {type(exc).__name__}: {str(exc)[:120]}"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="1 repetition")
    args = p.parse_args(argv)
    reps = 1 if args.smoke else args.reps
    load_start = os.getloadavg()[0]
    tok, vocab = tokenizer()
    path = token_path(tok)
    print(f"# schema engines: idefics2 tokenizer ({len(tok)} tokens, mask width {vocab}); invoice instance = "
          f"{len(path)} tokens; {reps} reps; load average at start {load_start:.2f}", flush=True)
    batches = (1, 8)
    engines = (Shipped, Llguidance, Xgrammar, XgrammarBatch, OutlinesCore)
    rows = [measure(cls, tok, vocab, path, reps, batches) for cls in engines]
    base = rows[0]
    headers = ["engine", "runs here", "tokenizer view", "compile invoice", "x first", "step b1", "x first",
               "step b8", "x first"]
    lines = []
    for r in rows:
        cells = [r["engine"], r["runs"]]
        for key in ("tokenizer_s", "compile_s", "step_b1_s", "step_b8_s"):
            if key not in r:
                cells += ["-"] * (1 if key == "tokenizer_s" else 2)
                continue
            cells.append(f"{r[key] * 1000:.3g} ms")
            if key != "tokenizer_s":
                cells.append(f"{r[key] / base[key]:.2f}x" if key in base else "-")
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines)]
    for cells in (headers, ["-" * w for w in widths], *lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |")
    print(f"# load average at the end: {os.getloadavg()[0]:.2f} (start {load_start:.2f}); on a shared machine "
          "these figures are provisional", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
