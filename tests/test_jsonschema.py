"""The tool-schema cleaner: vector 19, $ref inlining with cycles, unions, and a property test
that any JSON-Schema-ish input yields only keys Gemini's `Schema` knows."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.translate.jsonschema import (
    MAX_SCHEMA_NODES,
    SchemaError,
    to_gemini_parameters,
    to_response_schema,
)

SCHEMA_KEYS = {
    "type", "format", "description", "nullable", "enum", "items", "maxItems", "minItems",
    "properties", "required", "propertyOrdering", "minProperties", "maxProperties", "minLength",
    "maxLength", "pattern", "minimum", "maximum", "anyOf",
}  # fmt: skip


def _check_gemini(node: Any) -> None:
    """Recursively: only whitelisted keys, a single string type, enums of strings, non-empty
    properties, required a subset of properties."""
    assert isinstance(node, dict)
    assert set(node) <= SCHEMA_KEYS, set(node) - SCHEMA_KEYS
    if "type" in node:
        assert isinstance(node["type"], str)
    if "enum" in node:
        assert all(isinstance(v, str) for v in node["enum"])
    if "properties" in node:
        assert node["properties"]
        for sub in node["properties"].values():
            _check_gemini(sub)
    if "required" in node:
        assert set(node["required"]) <= set(node.get("properties", {}))
    if "items" in node:
        _check_gemini(node["items"])
    if node.get("type") == "array":
        assert "items" in node
    for b in node.get("anyOf", ()):
        _check_gemini(b)
    assert "type" in node or "anyOf" in node


def test_vector_19() -> None:
    src = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "mode": {"const": "fast"},
            "n": {"type": ["integer", "null"], "exclusiveMinimum": 0},
            "p": {"$ref": "#/$defs/P"},
        },
        "required": ["mode"],
        "$defs": {"P": {"type": "string"}},
    }
    before = copy.deepcopy(src)
    out = to_gemini_parameters(src)
    assert src == before  # input untouched
    assert out == {
        "type": "object",
        "properties": {
            "mode": {"type": "string", "enum": ["fast"]},
            "n": {"type": "integer", "nullable": True},
            "p": {"type": "string"},
        },
        "required": ["mode"],
    }
    _check_gemini(out)


@pytest.mark.parametrize(
    "params", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}]
)
def test_no_parameters_invented(params: dict[str, Any] | None) -> None:
    assert to_gemini_parameters(params) is None


def test_recursive_ref_is_cut_at_the_cycle() -> None:
    src = {
        "type": "object",
        "properties": {"root": {"$ref": "#/definitions/Node"}},
        "definitions": {
            "Node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/definitions/Node"}},
                },
            }
        },
    }
    out = to_gemini_parameters(src)
    assert out is not None
    _check_gemini(out)
    node = out["properties"]["root"]
    assert node["properties"]["value"] == {"type": "integer"}
    assert node["properties"]["children"]["items"]["type"] == "object"
    assert "$ref" not in orjson.dumps(out).decode()


def test_self_ref_to_root() -> None:
    out = to_gemini_parameters(
        {"type": "object", "properties": {"next": {"$ref": "#"}, "v": {"type": "string"}}}
    )
    assert out is not None
    _check_gemini(out)
    assert out["properties"]["next"]["properties"]["next"]["type"] == "object"


def test_exponential_ref_fanout_is_refused() -> None:
    defs: dict[str, Any] = {"D0": {"type": "string"}}
    for i in range(1, 30):
        prev = {"$ref": f"#/$defs/D{i - 1}"}
        defs[f"D{i}"] = {"type": "object", "properties": {"a": prev, "b": prev}}
    with pytest.raises(SchemaError):
        to_gemini_parameters(
            {"type": "object", "properties": {"x": {"$ref": "#/$defs/D29"}}, "$defs": defs}
        )
    assert MAX_SCHEMA_NODES >= 1000


def test_unions_and_nullables() -> None:
    out = to_gemini_parameters(
        {
            "type": "object",
            "properties": {
                "a": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "A"},
                "b": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                "c": {"type": ["string", "integer", "null"]},
                "d": {"allOf": [{"type": "object", "properties": {"x": {"type": "string"}}},
                                {"properties": {"y": {"type": "number"}}, "required": ["y"]}]},
                "e": {"enum": [1, 2, 3]},
                "f": {"type": "string", "format": "uri", "default": "x", "examples": ["y"],
                      "title": "F", "minLength": 1},
                "g": {"type": "array"},
                "h": True,
                "i": False,
                "j": {"type": "object", "additionalProperties": {"type": "string"}},
                "k": {"type": "string", "format": "date-time"},
            },
        }
    )  # fmt: skip
    assert out is not None
    _check_gemini(out)
    p = out["properties"]
    assert p["a"] == {"type": "string", "nullable": True, "description": "A"}
    assert p["b"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert p["c"]["nullable"] is True and len(p["c"]["anyOf"]) == 2
    assert set(p["d"]["properties"]) == {"x", "y"} and p["d"]["required"] == ["y"]
    assert p["e"]["type"] == "integer" and "1, 2, 3" in p["e"]["description"]
    assert p["f"] == {"type": "string", "minLength": 1}
    assert p["g"]["items"] == {"type": "string"}
    assert "i" not in p
    assert p["j"] == {"type": "object"}
    assert p["k"]["format"] == "date-time"


def test_property_named_like_keywords_survive() -> None:
    out = to_gemini_parameters(
        {
            "type": "object",
            "properties": {"type": {"type": "string"}, "$ref": {"type": "string"}},
            "required": ["type", "$ref"],
        }
    )
    assert out is not None
    assert set(out["properties"]) == {"type", "$ref"}
    assert out["required"] == ["type", "$ref"]


def test_unresolvable_and_remote_refs() -> None:
    out = to_gemini_parameters(
        {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/$defs/Missing"},
                "b": {"$ref": "https://example.com/s.json"},
            },
        }
    )
    assert out is not None
    _check_gemini(out)


def test_response_schema_keeps_json_schema() -> None:
    src = {
        "$schema": "x",
        "type": "object",
        "properties": {"a": {"const": 1}, "b": {"$ref": "#/definitions/B"}},
        "definitions": {"B": {"type": ["string", "null"], "examples": ["q"]}},
        "additionalProperties": False,
        "allOf": [{"required": ["a"]}],
    }
    out = to_response_schema(src)
    assert "$schema" not in out
    assert out["properties"]["a"] == {"enum": [1]}
    assert out["properties"]["b"] == {"$ref": "#/$defs/B"}
    assert out["$defs"]["B"] == {"type": ["string", "null"]}
    assert out["additionalProperties"] is False
    assert out["required"] == ["a"]


_leaf = st.sampled_from(
    [
        {"type": "string"}, {"type": "integer"}, {"type": ["number", "null"]}, {"const": "x"},
        {"enum": ["a", 1]}, {"$ref": "#/$defs/A"}, {"$ref": "#"}, {"$ref": "#/nope"}, True, False,
        {}, {"type": "weird"}, {"format": "email"}, {"type": "array"}, {"nullable": True},
        {"type": "null"}, {"$ref": 5}, {"enum": []}, {"type": []}, 7, "str", None,
    ]
)  # fmt: skip


def _node(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(["properties", "items", "anyOf", "oneOf", "allOf", "required"])
    return st.dictionaries(keys, st.one_of(kids, st.lists(kids, max_size=3),
                           st.dictionaries(st.text(max_size=3), kids, max_size=3)),
                           max_size=3).map(lambda d: {"type": "object", **d})  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaf, _node, max_leaves=25))
def test_property_output_is_always_gemini_safe(schema: Any) -> None:
    root = {"type": "object", "properties": {"p": schema}, "$defs": {"A": schema}}
    try:
        out = to_gemini_parameters(root)
    except SchemaError:
        return
    if out is not None:
        _check_gemini(out)
        orjson.dumps(out)
