"""Whether a JSON Schema has a finite instance: `finite(schema)`; `check_finite(schema)` (structured.check_schema)
refuses one that has none (UsageError).

Contract: False only when no value of finite depth can satisfy the schema through what is followed here (`type`,
required properties, `minItems` with `prefixItems`/`items`, `anyOf`, `allOf`, `enum`/`const`, `false` and local
`$ref`s, e.g. an object that requires itself); anything else is taken as satisfiable (llguidance judges it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from .errors import UsageError

TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


def check_finite(schema: dict) -> None:
    if not finite(schema):
        raise UsageError("--schema has no finite instance: a required property or item needs itself without end",
                         "make the recursion optional: leave it out of `required`, or allow an empty array")


def finite(schema: dict) -> bool:
    """The least fixpoint of "has a finite instance" over the schema's local `$ref`s (each assumed to have none until
    its target is shown to have one)."""
    good: set[str] = set()
    refs: dict[str, Any] = {"#": schema}  # each $ref reached, and its target

    def can(node) -> bool:
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            refs.setdefault(ref, _target(schema, ref))
            if ref not in good:
                return False
        if not all(can(sub) for sub in node.get("allOf", ())) or "anyOf" in node and not any(map(can, node["anyOf"])):
            return False
        if "enum" in node or "const" in node:
            return True
        types = node.get("type", TYPES)
        return any(_can_be(kind, node, can) for kind in ([types] if isinstance(types, str) else types))

    state = None
    while state != (len(good), len(refs)):  # until a round finds no new target and no new $ref
        state = (len(good), len(refs))
        good.update([ref for ref, node in list(refs.items()) if can(node)])
    return "#" in good


def _can_be(kind: str, node: dict, can) -> bool:
    """Whether `node` has a finite instance of JSON type `kind`, given `can` for its subschemas."""
    if kind == "object":  # a required property that is not listed: taken as possible
        properties = node.get("properties", {})
        return all(can(properties[key]) for key in node.get("required", ()) if key in properties)
    if kind == "array":
        items = node.get("items", True)
        listed = node.get("prefixItems", items if isinstance(items, list) else [])
        rest = True if isinstance(items, list) else items
        least = int(node.get("minItems", 0))
        return all(can(sub) for sub in listed[:least]) and (least <= len(listed) or can(rest))
    return True


def _target(schema: dict, ref: str) -> Any:
    """The subschema a local `$ref` (`#`, `#/a/b`) points to; True (anything) when it points nowhere known."""
    if ref != "#" and not ref.startswith("#/"):  # an anchor (`#name`)
        return True
    node: Any = schema
    for part in ref[2:].split("/") if ref != "#" else ():
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return True
    return node
