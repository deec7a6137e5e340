"""Tool declarations for Gemini: names, cleaned (memoised, budgeted) schemas, tool_config.

Shared by every front that declares tools (map_chat, map_responses, map_messages).

Invariants:
- Gemini function names are `[A-Za-z_][A-Za-z0-9_.:-]{0,63}`; any other client name is mapped
  deterministically (`safe_name`, so history and declarations agree) and recorded in the
  `Tools.origins` table the transcoders read back.
- A request's tool schemas share one work budget (`ToolSchemas.max_work`, charged for memo hits
  as for misses, so a refusal never depends on the memo): over it, a 400 naming the tool. With
  `inline_work`, cleaning past it raises SchemasOffLoop instead, for the caller to map the
  request again off the event loop.
- Cleaned schemas are memoised and shared: read-only once built.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
from collections import OrderedDict
from typing import Any

import orjson

from rawgate.errors import BadRequest
from rawgate.sizes import deep_size
from rawgate.translate.call import ToolOrigin
from rawgate.translate.jsonschema import (
    DEFAULT_MAX_WORK,
    SchemaBudgetError,
    SchemaError,
    clean_parameters,
)

__all__ = [
    "DEFAULT_SCHEMAS",
    "DEFAULT_SCHEMA_CACHE_BYTES",
    "SchemasOffLoop",
    "ToolSchemas",
    "Tools",
    "allowed_tools",
    "custom_description",
    "flat_name",
    "named_tool",
    "safe_name",
    "tool_config",
]

# Same default as config.LimitsConfig.tool_schema_cache_max_bytes.
DEFAULT_SCHEMA_CACHE_BYTES = 64 * 1024 * 1024
_NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}")
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]")


def safe_name(name: str) -> str:
    """A Gemini-legal function name; identity for names that already are."""
    if _NAME_OK.fullmatch(name):
        return name
    s = _NAME_BAD_CHARS.sub("_", name) or "_"
    if not (s[0].isascii() and (s[0].isalpha() or s[0] == "_")):
        s = "_" + s
    if len(s) > 64 or s != name:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        s = s[:55] + "_" + digest
    return s


class SchemasOffLoop(Exception):
    """Cleaning this request's new tool schemas needs more than the `inline_work` it was given:
    map it again in a worker thread (without `inline_work`), where only the request's budget
    applies. What was cleaned so far stays memoised, so the second run repeats none of it."""


class ToolSchemas:
    """Cleaned tool schemas, memoised, plus the work budget of one request's schemas.

    Agents (Codex, Claude Code) resend the same tens of tool schemas every turn, and cleaning them
    was ~40% of the mapping time, so results are kept by the schema's JSON (up to 1 KiB, else a
    16-byte digest of it). The memo is bounded by entries (`max_entries`) and by bytes
    (`max_bytes`: `sizes.deep_size` of the cleaned schema plus its key); the least recently used
    entry goes first, and a schema larger than `max_bytes` on its own is cleaned but not kept.
    Every entry remembers the work its cleaning took, and a hit charges that same work to the
    request's budget (`max_work` per request), so whether a request is refused never depends on
    what other requests left in the memo. Results are shared: nobody may mutate a request body.
    Thread-safe (the gateway maps heavy requests in worker threads): the memo's bookkeeping is
    under a lock, cleaning is not.
    """

    __slots__ = ("_entries", "_lock", "bytes", "max_bytes", "max_entries", "max_work")

    def __init__(
        self,
        max_bytes: int = DEFAULT_SCHEMA_CACHE_BYTES,
        max_work: int = DEFAULT_MAX_WORK,
        max_entries: int = 512,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_work = max_work
        self.max_entries = max_entries
        self.bytes = 0  # held by the entries, as deep_size counts it
        self._entries: OrderedDict[bytes, tuple[dict[str, Any] | None, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, raw: bytes) -> bool:
        return _memo_key(raw) in self._entries

    def clean(
        self, raw: bytes, work_left: int, fresh_left: int | None = None
    ) -> tuple[dict[str, Any] | None, int, int]:
        """(cleaned schema, work charged, work done now) for the schema JSON `raw`. The charge is
        at most `work_left`, else SchemaBudgetError; a miss also cleans at most `fresh_left`
        units, else SchemasOffLoop. Nothing is kept for a schema that failed."""
        key = _memo_key(raw)
        entry = self._entries.get(key)  # one C-level operation each: atomic under the GIL
        if entry is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile
                pass
            out, work, _ = entry
            if work > work_left:
                raise SchemaBudgetError("no work left")
            return out, work, 0
        inline = fresh_left is not None and fresh_left < work_left
        limit = fresh_left if fresh_left is not None and inline else work_left
        try:
            out, work = clean_parameters(orjson.loads(raw), limit)
        except SchemaBudgetError:
            if inline:
                raise SchemasOffLoop from None
            raise
        size = (deep_size(out) if out is not None else 0) + sys.getsizeof(key)
        if size <= self.max_bytes and self.max_entries > 0:
            with self._lock:
                entries = self._entries
                if key not in entries:
                    if key is raw:  # orjson's output keeps its spare capacity: keep a tight copy
                        key = bytes(memoryview(raw))
                    entries[key] = (out, work, size)
                    self.bytes += size
                while self.bytes > self.max_bytes or len(entries) > self.max_entries:
                    self.bytes -= entries.popitem(last=False)[1][2]
        return out, work, work


def _memo_key(raw: bytes) -> bytes:
    """A small schema is its own key (hashing it is ~0.2 us, a digest ~1 us); a large one is
    keyed by a 16-byte digest, so the memo does not hold the schema's JSON as well."""
    return raw if len(raw) <= 1024 else hashlib.blake2b(raw, digest_size=16).digest()


DEFAULT_SCHEMAS = ToolSchemas()


def flat_name(name: str, namespace: str | None) -> str:
    if not namespace or name.startswith(namespace + "__"):
        return name
    return f"{namespace}__{name}"


# ---- tools ---------------------------------------------------------------------------------------


class Tools:
    """Function declarations plus the reverse map the transcoders need."""

    __slots__ = ("by_client", "decls", "fresh_left", "origins", "schemas", "search", "work_left")

    def __init__(
        self, schemas: ToolSchemas = DEFAULT_SCHEMAS, inline_work: int | None = None
    ) -> None:
        self.schemas = schemas
        self.work_left = schemas.max_work  # shared by all the request's tool schemas
        self.fresh_left = inline_work  # cleaning (memo misses) allowed in this call
        self.decls: list[dict[str, Any]] = []
        self.origins: dict[str, ToolOrigin] = {}
        self.by_client: dict[tuple[str | None, str], str] = {}
        self.search = False

    def add(
        self,
        name: str,
        *,
        kind: str,
        namespace: str | None,
        description: str | None,
        params: dict[str, Any] | None,
        param: str,
    ) -> None:
        if not name:
            raise BadRequest("A tool needs a name.", param=param + ".name")
        key = (namespace, name)
        if key in self.by_client:
            raise BadRequest(f"Duplicate tool name '{name}'.", param=param + ".name")
        gname = safe_name(flat_name(name, namespace))
        if gname in self.origins:  # two client names sanitised alike: make the second unique
            gname = (
                gname[:55] + "_" + hashlib.blake2b(repr(key).encode(), digest_size=4).hexdigest()
            )
        decl: dict[str, Any] = {"name": gname}
        if description:
            decl["description"] = description
        if kind == "custom":
            decl["parameters"] = {
                "type": "object",
                "properties": {"input": {"type": "string", "description": "The raw tool input."}},
                "required": ["input"],
            }
        else:
            cleaned = None
            try:
                if params:
                    raw = orjson.dumps(params)
                    cleaned, work, fresh = self.schemas.clean(raw, self.work_left, self.fresh_left)
                    self.work_left -= work
                    if self.fresh_left is not None:
                        self.fresh_left -= fresh
            except SchemaBudgetError:
                raise BadRequest(
                    f"Tool '{name}': the request's tool schemas need more than"
                    f" {self.schemas.max_work} units of work (schema nodes, $ref steps and copied"
                    " values once $refs are inlined; limits.tool_schema_max_work).",
                    param=param + ".parameters",
                ) from None
            except SchemaError as e:
                raise BadRequest(f"Tool '{name}': {e}.", param=param + ".parameters") from None
            if cleaned is not None:
                decl["parameters"] = cleaned
        self.decls.append(decl)
        self.by_client[key] = gname
        self.origins[gname] = ToolOrigin(
            kind="custom" if kind == "custom" else "function", name=name, namespace=namespace
        )

    def gemini_name(self, name: str, namespace: str | None = None) -> str:
        got = self.by_client.get((namespace, name))
        return got if got is not None else safe_name(flat_name(name, namespace))

    def body(self) -> list[dict[str, Any]] | None:
        if self.decls:
            return [{"functionDeclarations": self.decls}]
        if self.search:
            return [{"googleSearch": {}}]
        return None


def custom_description(desc: str | None, fmt: dict[str, Any] | None) -> str | None:
    """A freeform tool's grammar is the model's only guide to a valid `input`; Gemini cannot
    enforce it, so it travels in the description."""
    if not fmt or fmt.get("type") != "grammar" or not isinstance(fmt.get("definition"), str):
        return desc
    syntax = fmt.get("syntax") or "grammar"
    note = f"The `input` argument must follow this {syntax} grammar:\n{fmt['definition']}"
    return f"{desc}\n\n{note}" if desc else note


def tool_config(mode: str, names: list[str] | None = None) -> dict[str, Any]:
    fcc: dict[str, Any] = {"mode": mode}
    if names:
        fcc["allowedFunctionNames"] = names
    return {"functionCallingConfig": fcc}


def named_tool(tools: Tools, name: str, namespace: str | None, param: str) -> str:
    gname = tools.by_client.get((namespace, name))
    if gname is None:
        raise BadRequest(f"tool_choice names '{name}', which is not among the tools.", param=param)
    return gname


def allowed_tools(
    tools: Tools, mode: str | None, refs: list[dict[str, Any]], param: str
) -> dict[str, Any]:
    names = []
    for r in refs:
        inner = r.get("function") or r.get("custom") or r
        n = inner.get("name") if isinstance(inner, dict) else None
        if isinstance(n, str):
            names.append(named_tool(tools, n, r.get("namespace"), param))
    if mode == "required":
        return tool_config("ANY", names)
    # "auto" over a subset: only those functions are declared, so the model may pick no other.
    keep = set(names)
    tools.decls = [d for d in tools.decls if d["name"] in keep]
    return tool_config("AUTO")
