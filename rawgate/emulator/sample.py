"""A JSON value that satisfies a response schema: the emulator's structured output.

Invariants:
- Pure: `sample(schema, text)` -> a JSON-able value; strings are filled with `text` (the echo),
  so a test sees its prompt inside the structured answer.
- Follows what `responseJsonSchema` and `responseSchema` carry: `$ref` into `$defs` /
  `definitions` (JSON pointers from the root), `allOf` (merged), `anyOf`/`oneOf` (the first
  non-null branch), `type` lists, `nullable`, tuples (`prefixItems`), `enum`, `const`,
  `minItems`/`maxItems`, `minimum`/`maximum` (and exclusive bounds, `multipleOf`),
  `minLength`/`maxLength`, `uniqueItems`, `minProperties`, `propertyOrdering` and well-known
  string `format`s. camelCase and snake_case keys both count; types are case-insensitive.
  `pattern` is not followed (the value is the echo text).
- Bounded work for recursive schemas: past LEAN_DEPTH nesting or MAX_NODES values the sampler
  turns lean (only required properties, the fewest items allowed, null where allowed); past
  MAX_DEPTH it gives up on the branch with null.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "MAX_NODES", "sample"]

LEAN_DEPTH = 12  # deeper than this, optional parts are left out
MAX_DEPTH = 64  # a required self-reference cannot be satisfied: null past this
MAX_NODES = 2000  # values generated per sample before the sampler turns lean
MAX_ITEMS = 64  # minItems is honoured up to this many items

# Values for string formats a parser checks (Pydantic's datetime, date, UUID, ...).
_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "iri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _get(schema: dict[str, Any], camel: str) -> Any:
    if camel in schema:
        return schema[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return schema.get(snake)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class _Sampler:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self.root = root
        self.text = text
        self.nodes = 0

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else ():
            key = raw.replace("~1", "/").replace("~0", "~")
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                return {}
        return node

    def expand(self, schema: Any, depth: int) -> dict[str, Any] | bool:
        """`schema` with `$ref` followed and `allOf` merged in."""
        hops = 0
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and hops < 32:
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else target
            hops += 1
        if isinstance(schema, bool):
            return schema
        if not isinstance(schema, dict):
            return {}
        all_of = _get(schema, "allOf")
        if isinstance(all_of, list) and all_of:
            merged = {k: v for k, v in schema.items() if k not in ("allOf", "all_of")}
            for part in all_of:
                p = self.expand(part, depth + 1)
                if not isinstance(p, dict):
                    continue
                for k, v in p.items():
                    if k == "properties" and isinstance(v, dict):
                        merged["properties"] = {**v, **(merged.get("properties") or {})}
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = [*(merged.get("required") or []), *v]
                    else:
                        merged.setdefault(k, v)
            return merged
        out: dict[str, Any] = schema
        return out

    def value(self, raw: Any, depth: int, variant: int = 0) -> Any:
        self.nodes += 1
        if depth > MAX_DEPTH:
            return None
        schema = self.expand(raw, depth)
        if schema is True:
            return self.text
        if schema is False:
            return None
        assert isinstance(schema, dict)
        lean = depth >= LEAN_DEPTH or self.nodes >= MAX_NODES
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[variant % len(enum)]
        for key in ("anyOf", "oneOf"):
            alts = _get(schema, key)
            if isinstance(alts, list) and alts:
                return self.value(self.pick(alts, lean, depth), depth + 1, variant)
        t = schema.get("type")
        if isinstance(t, list):
            names = [str(x).lower() for x in t]
            t = "null" if lean and "null" in names else next(
                (x for x in names if x != "null"), "null")
        if t is None:
            t = self.infer(schema)
        t = str(t).lower()
        if schema.get("nullable") is True and lean:
            return None
        if t == "object":
            return self.obj(schema, depth, lean)
        if t == "array":
            return self.array(schema, depth, lean)
        if t in ("integer", "number"):
            return self.number(schema, t == "integer", variant)
        if t == "boolean":
            return variant % 2 == 0
        if t == "null":
            return None
        return self.string(schema, variant)

    def pick(self, alts: list[Any], lean: bool, depth: int) -> Any:
        def is_null(a: Any) -> bool:
            e = self.expand(a, depth + 1)
            return isinstance(e, dict) and str(e.get("type", "")).lower() == "null"

        if lean:
            null = next((a for a in alts if is_null(a)), None)
            if null is not None:
                return null
        return next((a for a in alts if not is_null(a)), alts[0])

    @staticmethod
    def infer(schema: dict[str, Any]) -> str:
        if any(k in schema for k in ("properties", "required", "additionalProperties",
                                     "additional_properties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "prefix_items", "minItems")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "multipleOf")):
            return "number"
        return "string"

    def obj(self, schema: dict[str, Any], depth: int, lean: bool) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        need = set(required) if isinstance(required, list) else set()
        order = _get(schema, "propertyOrdering")
        names = [n for n in order if n in props] if isinstance(order, list) else []
        names += [n for n in props if n not in names]
        out = {n: self.value(props[n], depth + 1) for n in names if not lean or n in need}
        extra = _get(schema, "additionalProperties")
        min_props = _get(schema, "minProperties")
        i = 0
        while isinstance(min_props, int) and len(out) < min(min_props, MAX_ITEMS):
            name = next((n for n in names if n not in out), None)
            if name is not None:
                out[name] = self.value(props[name], depth + 1)
            elif extra is False:
                break
            else:
                out[f"key{i}"] = self.value(extra if isinstance(extra, dict) else True, depth + 1)
                i += 1
        return out

    def array(self, schema: dict[str, Any], depth: int, lean: bool) -> list[Any]:
        prefix = _get(schema, "prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items", True if not prefix else False)
        lo = _get(schema, "minItems")
        hi = _get(schema, "maxItems")
        lo = min(lo, MAX_ITEMS) if isinstance(lo, int) and lo > 0 else 0
        want = max(lo, len(prefix) if prefix else (0 if lean else 1))
        if items is False or items is None:
            want = min(want, len(prefix)) if prefix else want
        if isinstance(hi, int) and hi >= 0:
            want = min(want, hi)
        unique = _get(schema, "uniqueItems") is True
        out = []
        for i in range(want):
            sub = prefix[i] if i < len(prefix) else (items if items is not False else True)
            out.append(self.value(sub, depth + 1, i if unique else 0))
        return out

    def number(self, schema: dict[str, Any], integer: bool, variant: int) -> int | float:
        lo, hi = _num(schema.get("minimum")), _num(schema.get("maximum"))
        xlo = _num(_get(schema, "exclusiveMinimum"))
        xhi = _num(_get(schema, "exclusiveMaximum"))
        step = _num(_get(schema, "multipleOf"))
        lo_open = hi_open = False
        if xlo is not None and (lo is None or xlo >= lo):
            lo, lo_open = xlo, True
        if xhi is not None and (hi is None or xhi <= hi):
            hi, hi_open = xhi, True
        if integer:  # open integer bounds close on the next integer inside
            if lo is not None:
                lo, lo_open = (math.floor(lo) + 1.0 if lo_open else math.ceil(lo)), False
            if hi is not None:
                hi, hi_open = (math.ceil(hi) - 1.0 if hi_open else math.floor(hi)), False
        if lo is None:
            v = 0.0 if hi is None or hi > 0 else (hi - 1 if hi_open else hi)
        elif not lo_open:
            v = lo
        else:
            v = (lo + hi) / 2 if hi is not None else lo + 1
        if variant:
            v += variant * (step or 1)
        if step and step > 0:
            v = math.ceil(v / step) * step
        if hi is not None and v > hi:
            v = hi
        return int(v) if integer else float(v)

    def string(self, schema: dict[str, Any], variant: int) -> str:
        fmt = schema.get("format")
        s = _FORMATS.get(fmt, self.text) if isinstance(fmt, str) else self.text
        if variant:
            s = f"{s} {variant}" if s == self.text else s
        lo, hi = _get(schema, "minLength"), _get(schema, "maxLength")
        if isinstance(hi, int) and hi >= 0 and len(s) > hi:
            s = s[:hi]
        if isinstance(lo, int) and len(s) < lo:
            s = s + "x" * (min(lo, 1 << 16) - len(s))
        return s


def sample(schema: Any, text: str) -> Any:
    """A value satisfying `schema` (a JSON Schema or Gemini `Schema` dict), strings from `text`."""
    root = schema if isinstance(schema, dict) else {}
    return _Sampler(root, text).value(schema, 0)
