"""The tool-schema cleaner: vector 19, $ref inlining with cycles, unions, and a property test
that any JSON-Schema-ish input yields only keys Gemini's `Schema` knows."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.translate.jsonschema import (
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_NODES,
    SchemaBudgetError,
    SchemaError,
    clean_parameters,
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


def _ref_chain(n: int, sibling: bool = False) -> dict[str, Any]:
    """x -> d0 -> d1 -> ... -> dn (a string): the shape of the 2.4 MB request that held the event
    loop for 37 s (each step copied the cycle-guard tuple). `sibling`: every link also carries a
    description and a key of its own, which a per-step merge would copy again and again."""
    defs: dict[str, Any] = {}
    for i in range(n):
        link: dict[str, Any] = {"$ref": f"#/$defs/d{i + 1}"}
        if sibling:
            link |= {"description": f"link {i}", f"k{i}": i}
        defs[f"d{i}"] = link
    defs[f"d{n}"] = {"type": "string", "description": "end"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


@pytest.mark.parametrize("sibling", [False, True])
def test_ref_chain_costs_linear_work(sibling: bool) -> None:
    works = {}
    for n in (2000, 4000):
        out, works[n] = clean_parameters(_ref_chain(n, sibling), max_work=10**9)
        assert out is not None
        # the outermost link's description wins (siblings override the target's)
        want = "link 0" if sibling else "end"
        assert out["properties"]["x"] == {"type": "string", "description": want}
        # one step + one pointer resolution per link (+ the link's 3 keys when it has siblings)
        assert works[n] <= (6 if sibling else 2) * n + 10
    assert works[4000] <= 2 * works[2000] + 10


def test_the_request_budget_stops_a_ref_chain_within_it() -> None:
    with pytest.raises(SchemaBudgetError):
        clean_parameters(_ref_chain(70_000), max_work=100_000)
    # within the budget the same chain shape is fine
    out, work = clean_parameters(_ref_chain(1000), max_work=100_000)
    assert out is not None and work <= 2010


def test_copies_are_charged_so_a_budget_bounds_them() -> None:
    """Values copied per node (here an allOf of 1000 refs to a 1000-property definition, and a
    10,000-value enum referenced by 400 properties) count as work: without that, a few hundred
    KB of input would make millions of copies within the node cap."""
    big = {"properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
    all_of = {"type": "object", "allOf": [{"$ref": "#/$defs/big"}] * 1000, "$defs": {"big": big}}
    with pytest.raises(SchemaBudgetError):
        clean_parameters(all_of, max_work=100_000)
    enum = {"enum": [f"v{i}" for i in range(10_000)]}
    props = {f"p{i}": {"$ref": "#/$defs/e"} for i in range(400)}
    fan = {"type": "object", "properties": props, "$defs": {"e": enum}}
    with pytest.raises(SchemaBudgetError):
        clean_parameters(fan, max_work=100_000)
    out, work = clean_parameters({**fan, "properties": dict(list(props.items())[:5])}, 100_000)
    assert out is not None and 50_000 <= work <= 50_100


def test_all_of_parts_may_share_a_ref_and_own_properties_win() -> None:
    src = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "allOf": [{"$ref": "#/$defs/P"}, {"$ref": "#/$defs/P"}, {"required": ["b"]}],
        "$defs": {"P": {"properties": {"a": {"type": "string"}, "b": {"type": "string"}}}},
    }
    out = to_gemini_parameters(src)
    assert out is not None
    assert out["properties"] == {"a": {"type": "integer"}, "b": {"type": "string"}}
    assert out["required"] == ["a", "b"]


def test_a_chain_nesting_deeper_than_the_cap_is_a_schema_error() -> None:
    """Each definition is an object whose property refers to the next: nesting grows with the
    chain (the JSON depth cap does not see it) and used to end in RecursionError (a 500)."""
    n = 600
    defs = {
        f"d{i}": {"type": "object", "properties": {"next": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "string"}
    root = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}
    with pytest.raises(SchemaError, match="deeper"):
        to_gemini_parameters(root)
    ok = {**root, "properties": {"x": {"$ref": f"#/$defs/d{n - MAX_SCHEMA_DEPTH + 2}"}}}
    assert to_gemini_parameters(ok) is not None


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


_leaf: st.SearchStrategy[Any] = st.sampled_from(
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
