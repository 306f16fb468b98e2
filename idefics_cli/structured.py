"""Structured output (`--schema`): parse and check a schema, constrain decoding to it (llguidance), read the answer.

`parse_schema(value)` / `as_schema(value)`: a JSON Schema file, inline JSON or llm's concise syntax -> a checked
`Schema`, keywords the grammar cannot enforce refused by name, before any model loads. `with_schema` is the question
the model sees; `row_grammar(engine, schema)` a row's `RowGrammar`, `mask_rows(logits, rows)` masks every live row in
place with one llguidance call; `read_answer` -> (data, None) or (None, code). torch inside functions only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import IdeficsError, UsageError
from .finite import check_finite

TRUNCATED, MISMATCH = "schema_truncated", "schema_mismatch"
SCHEMA_PROMPT = "Answer with JSON only, valid against this JSON Schema:"
CONCISE_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
SEPARATORS = (", ", ": ")  # item and key separators of the answer (json.dumps's); no other whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
INSTALL_HINT = "llguidance and jsonschema come with idefics-cli; reinstall them: pip install llguidance jsonschema"

# Keywords that only annotate, and those llguidance enforces (tests/test_structured.py); the rest are refused.
ANNOTATIONS = {"$schema", "$id", "$anchor", "$comment", "title", "description", "default", "examples",
               "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType"}
ENFORCED = {"type", "enum", "const", "$ref", "$defs", "definitions", "anyOf", "allOf",
            "properties", "required", "additionalProperties", "patternProperties", "maxProperties", "minProperties",
            "items", "prefixItems", "minItems", "maxItems",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
            "minLength", "maxLength", "pattern", "format"}
FORMATS = {"date", "time", "date-time", "duration", "email", "uri", "uuid", "ipv4", "ipv6", "hostname"}
WHY = {"oneOf": "use anyOf: exclusivity is not enforced", "not": "", "if": "", "then": "", "else": "",
       "uniqueItems": "", "contains": "", "minContains": "", "maxContains": "", "unevaluatedItems": "",
       "unevaluatedProperties": "use additionalProperties", "propertyNames": "", "dependentRequired": "",
       "dependentSchemas": ""}
_LOOKAROUND = re.compile(r"\(\?<?[=!]|\\[1-9]")
_SUBSCHEMA = {"additionalProperties", "items"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SUBSCHEMA_LISTS = {"anyOf", "allOf", "prefixItems", "items"}
_CLOSED_ONE = {"additionalProperties", "items", "not"}  # where `closed` looks for object schemas
_CLOSED_LISTS = {"anyOf", "allOf", "oneOf", "prefixItems", "items"}  # items: draft-07 tuples


@dataclass(frozen=True)
class Schema:
    """A checked `--schema`: the JSON Schema, its hash and where it came from."""

    schema: dict
    sha256: str
    source: str


def schema_hash(schema: dict) -> str:
    """SHA-256 of the schema as compact JSON with sorted keys."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_schema(value: str, grammar_check: bool = True, files: bool = True) -> Schema:
    """A `--schema` value -> a checked Schema; UsageError naming what is wrong. `files=False`: text that names a
    file is refused unread (MCP reads only the documents under its roots)."""
    text = value.strip()
    if not text:
        raise UsageError("--schema is empty")
    if text.startswith("{"):
        schema, source = _loads(text, "--schema"), "json"
    elif files and os.path.exists(value) and not os.path.isdir(value):  # a file, or a pipe: --schema <(jq ...)
        try:
            with open(value, encoding="utf-8-sig") as f:  # a BOM (Notepad) is skipped
                schema = _loads(f.read(), value)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the schema file {value}: {exc}") from exc
        source = "file"
    elif (text.endswith((".json", ".yaml", ".yml")) or "/" in text or os.sep in text) and not set(",\n") & set(text):
        raise UsageError("the schema names a file, which is not read here: give the JSON Schema itself, or fields"
                         if not files else f"the schema file {value} is a folder" if os.path.isdir(value) else
                         f"no such schema file: {value}")
    else:
        schema, source = concise_schema(text), "concise"
    schema = check_schema(schema)
    if grammar_check:
        grammar(schema)
    return Schema(schema, schema_hash(schema), source)


def as_schema(value, grammar_check: bool = True) -> Schema | None:
    """A `Schema` from a Schema, a dict (JSON Schema) or a string (file, inline JSON or concise); None stays None."""
    if value is None or isinstance(value, Schema):
        return value
    if isinstance(value, dict):
        value = check_schema(value)
        if grammar_check:
            grammar(value)
        return Schema(value, schema_hash(value), "json")
    if isinstance(value, (str, os.PathLike)):
        return parse_schema(os.fspath(value), grammar_check)
    raise UsageError(f"schema must be a JSON Schema (a dict), a string or a file path, not {type(value).__name__}")


def permissive_object() -> Schema:
    """Any JSON object (keys and values of any JSON type): `response_format: {"type": "json_object"}`."""
    schema = {"type": "object", "additionalProperties": True}
    return Schema(schema, schema_hash(schema), "json")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise UsageError(f"{where} is nested too deeply") from None


def concise_schema(text: str) -> dict:
    """llm's concise syntax -> an object JSON Schema (every field required, in the order given)."""
    fields = [f.strip() for f in text.split("\n" if "\n" in text else ",") if f.strip()]
    properties: dict[str, dict] = {}
    for field in fields:
        info, _, description = field.partition(":")
        parts = info.split()
        if not parts:
            raise UsageError(f"--schema field {field!r} has no name", "write it as: name [int|float|bool|str]")
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in CONCISE_TYPES):
            raise UsageError(f"--schema field {field!r}: unknown type {' '.join(parts[1:])!r}",
                             "types are str (the default), int, float and bool")
        if parts[0] in properties:
            raise UsageError(f"--schema names the field {parts[0]!r} twice")
        prop = {"type": CONCISE_TYPES[parts[1] if len(parts) == 2 else "str"]}
        if description.strip():
            prop["description"] = description.strip()
        properties[parts[0]] = prop
    if not properties:
        raise UsageError("--schema has no fields")
    return {"type": "object", "properties": properties, "required": list(properties)}


def check_schema(schema: Any) -> dict:
    """Its JSON copy (strict: no NaN), checked by the meta-schema, every keyword one the grammar enforces."""
    jsonschema = _need("jsonschema")
    if not isinstance(schema, dict):
        raise UsageError(f"a JSON Schema must be an object, not {type(schema).__name__}")
    if not isinstance(schema.get("$schema", ""), str):  # jsonschema's validator_for fails on one
        raise UsageError(f"invalid JSON Schema: '$schema' at /$schema: {schema['$schema']!r} is not a string")
    try:  # Python's json reads NaN, Infinity and 1e400 (inf); a dict may hold anything, keys of any type
        schema = json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"the schema is not valid JSON: {exc}") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
        _check_keywords(schema, "")
        check_finite(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        keyword = exc.path[-1] if exc.path else exc.validator
        raise UsageError(f"invalid JSON Schema: {keyword!r} at /{where}: {exc.message[:200]}") from None
    except RecursionError:
        raise UsageError("--schema is nested too deeply") from None
    return schema


def _check_keywords(node: Any, where: str) -> None:
    if isinstance(node, bool):
        return
    for key, sub in node.items():
        at = f"{where}/{key}"
        if key not in ENFORCED and key not in ANNOTATIONS and not key.startswith("x-"):  # x-: an extension's
            why = WHY.get(key)
            hint = why or "the grammar engine cannot enforce it; remove it"
            what = "is not enforced by constrained decoding" if why is not None else "is not supported"
            raise UsageError(f"--schema: keyword {key!r} at {at} {what}", hint)
        if key == "pattern" or key == "patternProperties":
            for pattern in [sub] if key == "pattern" else sub:
                if _LOOKAROUND.search(pattern):
                    raise UsageError(f"--schema: pattern {pattern!r} at {at} uses a lookaround or a backreference, "
                                     "which constrained decoding does not enforce")
        if key == "format" and sub not in FORMATS:
            raise UsageError(f"--schema: format {sub!r} at {at} is not enforced by constrained decoding",
                             f"formats that are: {', '.join(sorted(FORMATS))}")
        if key in _SUBSCHEMA_MAPS:
            for name, child in sub.items():
                _check_keywords(child, f"{at}/{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(sub, list):
            for k, child in enumerate(sub):
                _check_keywords(child, f"{at}/{k}")
        elif key in _SUBSCHEMA and isinstance(sub, (dict, bool)):
            _check_keywords(sub, at)


def _need(module: str):
    """llguidance or jsonschema; a UsageError saying how to reinstall it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed", INSTALL_HINT) from None


def with_schema(question: str, schema: Schema) -> str:
    """The question the model gets: `question`, a blank line, SCHEMA_PROMPT, a space, the schema's JSON."""
    return f"{question}\n\n{SCHEMA_PROMPT} {json.dumps(schema.schema, ensure_ascii=False)}"


def closed(node: Any) -> Any:
    """A copy of the schema `node` with `"additionalProperties": false` on every object schema that lists
    `properties` or `patternProperties` and has no `additionalProperties`."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, sub in node.items():
        if key in _SUBSCHEMA_MAPS and isinstance(sub, dict):
            out[key] = {name: closed(child) for name, child in sub.items()}
        elif key in _CLOSED_LISTS and isinstance(sub, list):
            out[key] = [closed(child) for child in sub]
        elif key in _CLOSED_ONE:
            out[key] = closed(sub)
        else:
            out[key] = sub
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar(schema: dict) -> str:
    """The llguidance grammar of `schema` (no tokenizer needed); UsageError if it cannot be built."""
    ll = _need("llguidance")
    try:  # llguidance's own recursion limit is a ValueError
        text = ll.LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), overrides=JSON_OPTIONS)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"--schema cannot be turned into a grammar: {str(exc)[:200]}") from None
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
        ll = _need("llguidance")
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
        text, view = grammar(schema), tokenizer_view(tokenizer, vocab_size, stop_ids)
        prototype = _need("llguidance").LLMatcher(view, text, log_level=0)
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
        _EXECUTOR.append(_need("llguidance").LLExecutor())
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


_COMPILED: dict[tuple, Compiled] = {}


def compiled(schema: Schema, tokenizer, vocab_size: int, stop_ids) -> Compiled:
    """The schema's grammar for (tokenizer, vocabulary width, stop tokens), built once per process."""
    key = (schema.sha256, tokenizer_key(tokenizer, vocab_size, stop_ids))
    if key not in _COMPILED:
        _COMPILED[key] = Compiled.of(schema.schema, tokenizer, vocab_size, stop_ids)
    return _COMPILED[key]


def _engine_args(engine) -> tuple:
    return engine.processor.tokenizer, engine.model.config.get_text_config().vocab_size, engine.eos_ids


def row_grammar(engine, schema: Schema) -> RowGrammar:
    return RowGrammar(compiled(schema, *_engine_args(engine)))


def read_answer(text: str, schema: Schema, finish_reason: str | None) -> tuple[Any, str | None]:
    """(data, None) for an answer that parses and validates; else (None, TRUNCATED or MISMATCH)."""
    jsonschema = _need("jsonschema")
    cls = jsonschema.validators.validator_for(schema.schema, default=jsonschema.Draft202012Validator)
    try:
        data = json.loads(text)
        if cls(schema.schema, format_checker=cls.FORMAT_CHECKER).is_valid(data):
            return data, None
    except json.JSONDecodeError:
        pass
    return None, TRUNCATED if finish_reason == "length" else MISMATCH


def answer_error(code: str, max_new_tokens: int | None = None):
    """The IdeficsError of a `read_answer` code (exit 5, like generation_error)."""
    if code == TRUNCATED:
        cut = f" --max-new-tokens {max_new_tokens}" if max_new_tokens else " --max-new-tokens"
        return IdeficsError(code, f"the answer was cut at{cut} before its JSON ended", "raise --max-new-tokens")
    return IdeficsError(code, "the answer does not validate against the schema",
                        "a format the grammar lets through (e.g. a date that does not exist)")
