"""Turn an OpenAI tool's JSON Schema into something every Gemini endpoint accepts.

Choice: function parameters go out as `parameters` (Gemini's OpenAPI-3.0 `Schema` subset), cleaned
here, not as `parametersJsonSchema`. The `Schema` subset has one documented key whitelist that
the Developer API, Code Assist and every model generation (2.0 to 3.x) accept, so the output can
be checked offline (the emulator and the tests do); `parametersJsonSchema` acceptance varies by
model and endpoint, and a rejection costs the user a failed turn, not a slightly looser schema.
What is lost is only validation detail (exclusive bounds, `additionalProperties`, ...), which the
model never enforced anyway. Structured output (`responseJsonSchema`) keeps JSON Schema, lightly
filtered by `to_response_schema`.

Invariants of `to_gemini_parameters`:
- Input is never mutated; output shares no dicts with it (arguments in history are not schemas
  and never pass through here).
- Output keys are only those of Gemini's `Schema`: no `$ref`/`$defs`, no `const`, no array
  `type`, no `oneOf`/`allOf`, no `additionalProperties`, `$schema`, `default`, `examples`,
  exclusive bounds, `propertyNames`, `title`; `format` only where Gemini allows it.
- `$ref` is inlined (local JSON pointers); a reference cycle becomes a plain `object` at the point
  it recurs, and the total output is capped at MAX_SCHEMA_NODES, so a schema cannot explode.
- `const` -> one-value `enum`; `["T", "null"]` and null branches -> `nullable: true`; `oneOf` ->
  `anyOf`; `allOf` merged; one-branch `anyOf` collapsed. Non-string enums (Gemini takes strings
  only) are dropped and listed in the description instead, so the model still sees them.
- An object with no properties loses the empty `properties` (Gemini rejects it); a whole
  parameter schema that is an empty object yields None: no parameter is invented.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["MAX_SCHEMA_NODES", "SchemaError", "to_gemini_parameters", "to_response_schema"]

# Output schema nodes per tool. Real tool schemas have tens to a few hundred; the cap stops a
# small schema whose $refs fan out exponentially (each level referencing the previous twice).
MAX_SCHEMA_NODES = 5000

_STRING_FORMATS = frozenset({"enum", "date-time"})
_NUMBER_FORMATS = frozenset({"float", "double", "int32", "int64"})
_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})
# Copied as-is when their value has the right JSON type.
_INT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_NUM_KEYS = ("minimum", "maximum")


class SchemaError(ValueError):
    """The schema cannot be made acceptable (too large after inlining)."""


class _Cleaner:
    __slots__ = ("budget", "root")

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.budget = MAX_SCHEMA_NODES

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None  # remote refs are never fetched
        node: Any = self.root
        for raw in ref[1:].lstrip("/").split("/") if ref != "#" else ():
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node

    def deref(self, node: Any, stack: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        """Follow $ref chains; sibling keywords override the target's (2019-09 semantics)."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in stack:
                return {"type": "object", "description": _cycle_note(node)}, stack
            target = self.resolve(ref)
            if not isinstance(target, dict):
                target = {"type": "string"} if target is None else {}
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **rest}
            stack = (*stack, ref)
        return node, stack

    def clean(self, node: Any, stack: tuple[str, ...]) -> dict[str, Any] | None:
        self.budget -= 1
        if self.budget < 0:
            raise SchemaError(f"schema exceeds {MAX_SCHEMA_NODES} nodes once $refs are inlined")
        if node is False:
            return None
        if not isinstance(node, dict):
            return {"type": "string"} if node is True else None
        node, stack = self.deref(node, stack)
        if isinstance(node.get("allOf"), list):
            node, stack = self.merge_all_of(node, stack)

        out: dict[str, Any] = {}
        nullable = node.get("nullable") is True
        typ = node.get("type")
        if isinstance(typ, list):
            names = [t for t in typ if isinstance(t, str) and t.lower() in _TYPES]
            nullable = nullable or any(t.lower() == "null" for t in names)
            names = [t for t in names if t.lower() != "null"]
            if len(names) > 1:
                # ["string", "integer"]: one branch per type, each with the shared keywords.
                base = {k: v for k, v in node.items() if k not in ("type", "description")}
                split = [{**base, "type": t} for t in names]
                node = {"anyOf": split, "description": node.get("description")}
                typ = None
            else:
                typ = names[0] if names else None
        elif isinstance(typ, str) and typ.lower() not in _TYPES:
            typ = None

        branches_in = _list(node.get("anyOf")) + _list(node.get("oneOf"))
        if branches_in:
            branches: list[dict[str, Any]] = []
            for b in branches_in:
                c = self.clean(b, stack)
                if c is None:
                    continue
                if c.get("type") == "null":
                    nullable = True
                    continue
                if c.pop("nullable", False):
                    nullable = True
                branches.append(c)
            if len(branches) == 1 and typ is None:
                out.update(branches[0])
            elif branches:
                out["anyOf"] = branches
                if typ is not None:
                    out["type"] = typ

        if "const" in node:
            node = {**node, "enum": [node["const"]]}
        enum = node.get("enum")
        desc = node.get("description")
        if isinstance(enum, list) and enum:
            if all(isinstance(v, str) for v in enum):
                out["enum"] = list(enum)
                typ = typ or "string"
            else:
                values = ", ".join(orjson.dumps(v).decode() for v in enum)
                desc = f"{desc} (allowed values: {values})" if desc else f"Allowed values: {values}"
                if typ is None:
                    typ = _infer_enum_type(enum)
        if isinstance(desc, str) and desc:
            out["description"] = desc

        if typ is None and "anyOf" not in out and "type" not in out:
            if isinstance(node.get("properties"), dict):
                typ = "object"
            elif "items" in node:
                typ = "array"
            else:
                # "Any value": Gemini needs a type; a string carries any value as text.
                typ = "string"
        if typ is not None:
            out["type"] = typ
            self.fill_typed(out, node, typ.lower(), stack)
        if nullable:
            out["nullable"] = True
        return out

    def fill_typed(
        self, out: dict[str, Any], node: dict[str, Any], typ: str, stack: tuple[str, ...]
    ) -> None:
        fmt = node.get("format")
        if isinstance(fmt, str) and (
            (typ == "string" and fmt in _STRING_FORMATS)
            or (typ in ("number", "integer") and fmt in _NUMBER_FORMATS)
        ):
            out["format"] = fmt
        for k in _INT_KEYS:
            v = node.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out[k] = v
        if typ in ("number", "integer"):
            for k in _NUM_KEYS:
                v = node.get(k)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[k] = v
        if typ == "string" and isinstance(node.get("pattern"), str):
            out["pattern"] = node["pattern"]
        if typ == "array":
            items = node.get("items")
            if isinstance(items, list):  # draft-4 tuple form: Gemini has one item schema
                items = {"anyOf": items} if len(items) > 1 else (items[0] if items else True)
            cleaned = self.clean(items if items is not None else True, stack)
            out["items"] = cleaned if cleaned is not None else {"type": "string"}
        elif typ == "object":
            props = node.get("properties")
            if isinstance(props, dict) and props:
                cleaned_props: dict[str, Any] = {}
                for name, sub in props.items():
                    c = self.clean(sub, stack)
                    if c is not None:
                        cleaned_props[name] = c
                if cleaned_props:
                    out["properties"] = cleaned_props
                    req = node.get("required")
                    if isinstance(req, list):
                        names = [r for r in req if isinstance(r, str)]
                        seen = [r for r in dict.fromkeys(names) if r in cleaned_props]
                        if seen:
                            out["required"] = seen
                    order = node.get("propertyOrdering")
                    if isinstance(order, list) and all(
                        isinstance(o, str) and o in cleaned_props for o in order
                    ):
                        out["propertyOrdering"] = list(order)

    def merge_all_of(
        self, node: dict[str, Any], stack: tuple[str, ...]
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """One schema from an allOf; the refs followed join the cycle guard of what follows."""
        merged = {k: v for k, v in node.items() if k != "allOf"}
        seen = stack
        for part in node["allOf"]:
            self.budget -= 1
            if self.budget < 0:
                raise SchemaError(f"schema exceeds {MAX_SCHEMA_NODES} nodes once $refs are inlined")
            part, followed = self.deref(part, stack)
            seen = (*seen, *followed[len(stack) :])
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("allOf"), list):
                part, followed = self.merge_all_of(part, followed)
                seen = (*seen, *followed[len(stack) :])
            for k, v in part.items():
                if k == "properties" and isinstance(v, dict):
                    merged["properties"] = {**v, **_dict(merged.get("properties"))}
                elif k == "required" and isinstance(v, list):
                    merged["required"] = [*_list(merged.get("required")), *v]
                else:
                    merged.setdefault(k, v)
        return merged, seen


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _cycle_note(node: dict[str, Any]) -> str:
    desc = node.get("description")
    note = "A nested value of the same shape as its ancestor."
    return f"{desc} ({note})" if isinstance(desc, str) and desc else note


def _infer_enum_type(enum: list[Any]) -> str:
    if all(isinstance(v, bool) for v in enum):
        return "boolean"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in enum):
        return "integer"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in enum):
        return "number"
    return "string"


def to_gemini_parameters(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `parameters` Schema for a function declaration, or None when it takes none."""
    if not schema:
        return None
    out = _Cleaner(schema).clean(schema, ())
    if out is None:
        return None
    if out.get("type") == "object" and "properties" not in out:
        return None
    return out


# responseJsonSchema accepts JSON Schema but only these keywords (Gemini structured-output docs);
# anything else is dropped rather than risk a 400 for a keyword it does not know.
_RESPONSE_KEYS = frozenset(
    {
        "$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum",
        "items", "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf",
        "properties", "additionalProperties", "required", "propertyOrdering", "nullable",
    }
)  # fmt: skip
_SCHEMA_MAPS = frozenset({"properties", "$defs"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "prefixItems"})


def to_response_schema(schema: Any, _depth: int = 0) -> Any:
    """`responseJsonSchema` from a client's json_schema: known keywords only, `const` as enum,
    `definitions` renamed `$defs`, `allOf` flattened when its branches do not conflict."""
    if not isinstance(schema, dict) or _depth > 64:
        return schema
    node = dict(schema)
    if "definitions" in node and "$defs" not in node:
        node["$defs"] = node.pop("definitions")
    if "const" in node and "enum" not in node:
        node["enum"] = [node["const"]]
    all_of = node.pop("allOf", None)
    if isinstance(all_of, list):
        for part in all_of:
            for k, v in _dict(part).items():
                if k == "properties":
                    node["properties"] = {**_dict(v), **_dict(node.get("properties"))}
                elif k == "required":
                    node["required"] = [*_list(node.get("required")), *_list(v)]
                else:
                    node.setdefault(k, v)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k not in _RESPONSE_KEYS:
            continue
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {n: to_response_schema(s, _depth + 1) for n, s in v.items()}
        elif k in _SCHEMA_LISTS and isinstance(v, list):
            out[k] = [to_response_schema(s, _depth + 1) for s in v]
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = to_response_schema(v, _depth + 1)
        elif k == "$ref" and isinstance(v, str) and v.startswith("#/definitions/"):
            out[k] = "#/$defs/" + v[len("#/definitions/") :]
        else:
            out[k] = v
    return out
