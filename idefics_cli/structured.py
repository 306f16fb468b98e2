"""Structured output (`--schema`): parse and check a schema, constrain decoding to it, read the answer back.

`parse_schema(value)` / `as_schema(value)`: a JSON Schema file, inline JSON or llm's concise syntax -> a checked
`Schema`, keywords the grammar cannot enforce refused by name, before any model loads. `with_schema` is the question
the model sees; `row_grammar(engine, schema)` a row's grammar; `read_answer` -> (data, None) or (None, code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from . import grammar_engine
from .errors import UsageError
from .grammar_engine import SEPARATORS, RowGrammar, mask_rows  # noqa: F401 - the public interface

TRUNCATED = "schema_truncated"
MISMATCH = "schema_mismatch"
SCHEMA_PROMPT = "Answer with JSON only, valid against this JSON Schema:"
CONCISE_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}

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


@dataclass(frozen=True)
class Schema:
    """A checked `--schema`: the JSON Schema, its hash and where it came from."""

    schema: dict
    sha256: str
    source: str


def canonical(schema: dict) -> str:
    """The schema as compact JSON with sorted keys: what the hash covers."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_hash(schema: dict) -> str:
    return hashlib.sha256(canonical(schema).encode()).hexdigest()


def parse_schema(value: str, grammar_check: bool = True) -> Schema:
    """A `--schema` value -> a checked Schema; UsageError naming what is wrong."""
    text = value.strip()
    if not text:
        raise UsageError("--schema is empty")
    if text.startswith("{"):
        schema, source = _loads(text, "--schema"), "json"
    elif os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                schema = _loads(f.read(), value)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the schema file {value}: {exc}") from exc
        source = "file"
    elif (text.endswith(".json") or "/" in text or os.sep in text) and "," not in text and "\n" not in text:
        raise UsageError(f"no such schema file: {value}")
    else:
        schema, source = concise_schema(text), "concise"
    check_schema(schema)
    if grammar_check:
        grammar(schema)
    return Schema(schema, schema_hash(schema), source)


def as_schema(value, grammar_check: bool = True) -> Schema | None:
    """A `Schema` from a Schema, a dict (JSON Schema) or a string (file, inline JSON or concise); None stays None."""
    if value is None or isinstance(value, Schema):
        return value
    if isinstance(value, dict):
        check_schema(value)
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


def check_schema(schema: Any) -> None:
    """Meta-schema check, then every keyword must be one the grammar enforces (or an annotation)."""
    jsonschema = _jsonschema()
    if not isinstance(schema, dict):
        raise UsageError(f"a JSON Schema must be an object, not {type(schema).__name__}")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        keyword = exc.path[-1] if exc.path else exc.validator
        raise UsageError(f"invalid JSON Schema: {keyword!r} at /{where}: {exc.message[:200]}") from None
    _check_keywords(schema, "")


def _check_keywords(node: Any, where: str) -> None:
    if isinstance(node, bool):
        return
    for key, sub in node.items():
        at = f"{where}/{key}"
        if key not in ENFORCED and key not in ANNOTATIONS:
            if key.startswith("x-"):
                continue
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


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        raise UsageError("jsonschema is not installed", grammar_engine.INSTALL_HINT) from None
    return jsonschema


def with_schema(question: str, schema: Schema) -> str:
    """The question the model gets: `question`, a blank line, SCHEMA_PROMPT, a space, the schema's JSON."""
    return f"{question}\n\n{SCHEMA_PROMPT} {json.dumps(schema.schema, ensure_ascii=False)}"


def grammar(schema: dict) -> str:
    """The llguidance grammar of `schema` (no tokenizer, no torch); UsageError if it cannot be built."""
    return grammar_engine.grammar_text(schema)


_COMPILED: dict[tuple, grammar_engine.Compiled] = {}


def compiled(schema: Schema, tokenizer, vocab_size: int, stop_ids) -> grammar_engine.Compiled:
    """The schema's grammar for (tokenizer, vocabulary width, stop tokens), built once per process."""
    key = (schema.sha256, grammar_engine.tokenizer_key(tokenizer, vocab_size, stop_ids))
    if key not in _COMPILED:
        _COMPILED[key] = grammar_engine.Compiled.of(schema.schema, tokenizer, vocab_size, stop_ids)
    return _COMPILED[key]


def _engine_args(engine) -> tuple:
    return engine.processor.tokenizer, engine.model.config.get_text_config().vocab_size, engine.eos_ids


def row_grammar(engine, schema: Schema) -> RowGrammar:
    return RowGrammar(compiled(schema, *_engine_args(engine)))


def read_answer(text: str, schema: Schema, finish_reason: str | None) -> tuple[Any, str | None]:
    """(data, None) for an answer that parses and validates; else (None, TRUNCATED or MISMATCH)."""
    jsonschema = _jsonschema()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None, TRUNCATED if finish_reason == "length" else MISMATCH
    cls = jsonschema.validators.validator_for(schema.schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema.schema, format_checker=cls.FORMAT_CHECKER)
    if not validator.is_valid(data):
        return None, TRUNCATED if finish_reason == "length" else MISMATCH
    return data, None


def answer_error(code: str, max_new_tokens: int | None = None):
    """The IdeficsError of a `read_answer` code (exit 5, like generation_error)."""
    from .errors import IdeficsError

    if code == TRUNCATED:
        cut = f" --max-new-tokens {max_new_tokens}" if max_new_tokens else " --max-new-tokens"
        return IdeficsError(code, f"the answer was cut at{cut} before its JSON ended", "raise --max-new-tokens")
    return IdeficsError(code, "the answer does not validate against the schema",
                        "a format the grammar lets through (e.g. a date that does not exist)")
