"""finite.py: whether a JSON Schema has a finite instance (recursion through required properties and items)."""

from __future__ import annotations

import pytest

from idefics_cli.finite import finite


def node(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


SELF = {"$ref": "#/$defs/a", "$defs": {"a": node(a={"$ref": "#/$defs/a"})}}
CASES = [  # (schema, whether it has a finite instance)
    (SELF, False),
    (node(a={"$ref": "#"}), False),  # the root itself
    ({"definitions": {"n": node(n={"$ref": "#/definitions/n"})}, "$ref": "#/definitions/n"}, False),  # draft-07
    ({"$defs": {"a/b": node(x={"$ref": "#/$defs/a~1b"})}, "$ref": "#/$defs/a~1b"}, False),  # escaped pointer
    ({"$ref": "#/$defs/a", "$defs": {"a": node(p={"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]}),
                                     "b": node(q={"$ref": "#/$defs/a"})}}, False),  # two that need each other
    ({"$ref": "#/$defs/x", "$defs": {"x": {"type": "array", "items": {"$ref": "#/$defs/x"}, "minItems": 1}}}, False),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"$ref": "#"}], "minItems": 2}, False),
    (node(a=False), False),
    # recursion that can stop: kept
    ({"$ref": "#/$defs/a", "$defs": {"a": node(p={"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]}),
                                     "b": {"type": "object", "properties": {"q": {"$ref": "#/$defs/a"}}}}}, True),
    ({"$ref": "#/$defs/t", "$defs": {"t": {"type": "object", "properties": {
        "v": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "required": ["v"]}}},
     True),  # a tree whose children are optional
    ({"$ref": "#/$defs/t", "$defs": {"t": node(kids={"type": "array", "items": {"$ref": "#/$defs/t"}})}}, True),
    (node(next={"anyOf": [{"$ref": "#"}, {"type": "null"}]}), True),  # a linked list
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": ["object", "null"], "properties": {"a": {"$ref": "#/$defs/a"}},
                                           "required": ["a"]}}}, True),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"$ref": "#"}], "minItems": 1}, True),
    ({"properties": {"a": {"$ref": "#"}}, "required": ["a"]}, True),  # no type: a string is an instance
    ({"$ref": "#anchor"}, True),  # not followed: taken as possible
]


@pytest.mark.parametrize("schema, expected", CASES)
def test_a_schema_has_a_finite_instance_unless_its_recursion_is_required(schema, expected):
    assert finite(schema) is expected
