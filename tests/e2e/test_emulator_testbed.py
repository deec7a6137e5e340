"""The emulator as a test bed: keys added while `rawgate serve --emulate` runs, JSON mode and
structured outputs that real SDK parsers accept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import openai
import orjson
import pytest
from pydantic import BaseModel, Field

from rawgate.accounts.store import AccountStore
from rawgate.emulator.sample import _Sampler, sample
from rawgate.emulator.server import DEMO_API_KEY, Emulator
from tests.helpers_gateway import gateway_stack, serve_process

pytestmark = pytest.mark.anyio

RELOAD_POLLS = 100  # x 0.1 s: the server reloads accounts.json within a second
POLL_GAP_S = 0.1


def _chat(origin: str, prompt: str) -> tuple[int, str, dict[str, Any]]:
    body = orjson.dumps({"model": "gemini-2.5-flash",
                         "messages": [{"role": "user", "content": prompt}]})
    req = urllib.request.Request(origin + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("x-account-email", ""), orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-account-email", ""), orjson.loads(e.read())


def test_serve_emulate_accepts_a_key_added_while_it_runs(tmp_path: Path) -> None:
    env = {**os.environ, "RAWGATE_HOME": str(tmp_path)}
    with serve_process(tmp_path) as origin:
        status, who, _ = _chat(origin, "before")
        assert status == 200 and who == "emulator-demo"
        subprocess.run([sys.executable, "-m", "rawgate", "accounts", "add", "--api-key",
                        "NEWKEY-added-while-running", "--label", "x"], env=env, check=True,
                       capture_output=True)
        for _ in range(RELOAD_POLLS):  # until the server has reloaded accounts.json
            status, who, doc = _chat(origin, "after")
            if who != "emulator-demo":
                break
            time.sleep(POLL_GAP_S)
        assert who == "x", (status, who)
        assert status == 200, doc  # not API_KEY_INVALID from the in-process emulator
        assert doc["choices"][0]["message"]["content"] == "after"


# ---- JSON mode and structured outputs -----------------------------------------------------------


class Address(BaseModel):
    street: str
    city: str
    country: Literal["FR", "DE", "IT"]


class Color(StrEnum):
    red = "red"
    green = "green"


class Tag(BaseModel):
    name: str
    weight: int = Field(ge=3, le=5)


class Node(BaseModel):  # recursive: the sampler must stop
    name: str
    children: list[Node]


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=99)
    ratio: float = Field(ge=0.25, le=0.75)
    home: Address
    previous: list[Address] = Field(min_length=2, max_length=3)
    work: Address | None
    tags: list[Tag]
    color: Color
    point: tuple[int, str]
    kind: Literal["person"]
    tree: Node


async def test_openai_sdk_parse_with_nested_pydantic_models(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run:
        client = openai.AsyncOpenAI(base_url=run.base_url, api_key="sk-test", max_retries=0)
        async with client:
            r = await client.chat.completions.parse(
                model="gemini-2.5-flash", response_format=Person,
                messages=[{"role": "user", "content": "Ada"}])
        p = r.choices[0].message.parsed
        assert isinstance(p, Person), r.choices[0].message.content
        assert p.name == "Ada" and 18 <= p.age <= 99 and 0.25 <= p.ratio <= 0.75
        assert 2 <= len(p.previous) <= 3 and p.home.country in ("FR", "DE", "IT")
        assert isinstance(p.point[0], int) and p.point[1] == "Ada" and p.kind == "person"
        assert all(3 <= t.weight <= 5 for t in p.tags) and isinstance(p.tree, Node)
        # What rawgate sent: responseJsonSchema with the $ref/$defs of the nested models.
        sent = orjson.loads(run.emulator.core.recent[-1][4])
        rjs = sent["generationConfig"]["responseJsonSchema"]
        assert "$defs" in rjs and "Address" in rjs["$defs"]
        assert rjs["properties"]["home"] == {"$ref": "#/$defs/Address"}


class Everything(BaseModel):
    """Constraints rawgate's mapping would drop but a direct emulator user may send."""

    short: str = Field(min_length=3, max_length=5)
    long: str = Field(min_length=40)
    stamp: datetime
    day: date
    ident: uuid.UUID
    pos: float = Field(gt=1.5, lt=2.5)
    odd: int = Field(gt=10, multiple_of=7)
    neg: int = Field(lt=-3)
    mapping: dict[str, int]
    tup: tuple[int, int, str]
    unique: set[int] = Field(min_length=3)
    maybe: int | None = None
    node: Node


def test_sample_satisfies_pydantic_schemas_with_bounds_formats_and_refs() -> None:
    for model in (Person, Everything, Node):
        value = sample(model.model_json_schema(), "an echo of the prompt")
        model.model_validate(value)  # raises on any violation
    # Recursion is bounded: the tree stops, the work is counted in values, not time.
    s = _Sampler(Node.model_json_schema(), "x")
    s.value(s.root, 0)
    assert s.nodes < 200


def test_sample_keywords_one_by_one() -> None:
    assert sample({"const": 7}, "t") == 7
    assert sample({"enum": ["b", "a"]}, "t") == "b"
    assert sample({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                   "items": False}, "t") == [0, "t"]
    assert sample({"type": "array", "items": {"type": "integer"}, "minItems": 4,
                   "maxItems": 4}, "t") == [0, 0, 0, 0]
    assert sample({"type": "array", "maxItems": 0}, "t") == []
    assert sample({"type": "integer", "minimum": 5, "maximum": 9}, "t") == 5
    assert sample({"type": "integer", "maximum": -4}, "t") == -4
    assert sample({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "t") == 1.5
    assert sample({"type": "string", "maxLength": 2}, "text") == "te"
    assert sample({"type": "string", "minLength": 6}, "text") == "textxx"
    assert sample({"$defs": {"A": {"type": "integer", "minimum": 3}}, "type": "object",
                   "properties": {"a": {"$ref": "#/$defs/A"}}}, "t") == {"a": 3}
    assert sample({"definitions": {"A": {"const": "x"}}, "$ref": "#/definitions/A"}, "t") == "x"
    assert sample({"allOf": [{"properties": {"a": {"type": "integer"}}},
                             {"properties": {"b": {"type": "boolean"}}}]}, "t") == (
        {"a": 0, "b": True})
    assert sample({"anyOf": [{"type": "null"}, {"type": "integer"}]}, "t") == 0
    assert sample({"type": ["null", "string"]}, "t") == "t"
    # Gemini's own Schema: upper-case types, snake_case keys, propertyOrdering.
    assert sample({"type": "OBJECT", "properties": {"b": {"type": "STRING"},
                                                    "a": {"type": "INTEGER"}},
                   "propertyOrdering": ["a", "b"]}, "t") == {"a": 0, "b": "t"}
    assert list(sample({"type": "OBJECT", "properties": {"b": {"type": "STRING"},
                                                         "a": {"type": "INTEGER"}},
                        "property_ordering": ["a", "b"]}, "t")) == ["a", "b"]
    assert sample({"type": "ARRAY", "items": {"type": "STRING"}, "min_items": 2}, "t") == (
        ["t", "t"])


async def test_reply_directive_is_returned_as_given_in_json_mode() -> None:
    emu = Emulator()

    def gen(prompt: str, gen_cfg: dict[str, Any]) -> str:
        body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                             "generationConfig": gen_cfg})
        r = emu.handle("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "",
                       [(b"x-goog-api-key", DEMO_API_KEY.encode())], body)
        assert r.status == 200, r.body
        return str(orjson.loads(r.body)["candidates"][0]["content"]["parts"][0]["text"])

    given = '{"city": "Paris", "n": [1, 2]}'
    directive = "[[emu:reply text=" + orjson.dumps(given).decode() + "]]"
    assert gen(directive, {"responseMimeType": "application/json"}) == given
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert gen(directive, {"responseMimeType": "application/json",
                           "responseJsonSchema": schema}) == given
    assert gen("[[emu:reply text=\"not json\"]]",
               {"responseMimeType": "application/json"}) == "not json"
    # Without the directive: the schema's sample, or {"echo": ...} with no schema.
    assert orjson.loads(gen("Ada", {"responseMimeType": "application/json",
                                    "responseJsonSchema": schema})) == {"x": 0}
    assert orjson.loads(gen("Ada", {"responseMimeType": "application/json"})) == {"echo": "Ada"}


# ---- what the README says about error directives ----------------------------------------------


async def _post(client: openai.AsyncOpenAI, prompt: str, model: str = "gemini-2.5-flash") -> str:
    r = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}])
    return r.choices[0].message.content or ""


async def test_error_directives_quota_kinds_and_the_cooldown_they_leave(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=[(DEMO_API_KEY, "k")]) as run:
        c = openai.AsyncOpenAI(base_url=run.base_url, api_key="sk-test", max_retries=0)
        async with c:
            # Default 429: a zero-limit quota, terminal: insufficient_quota, no Retry-After.
            with pytest.raises(openai.RateLimitError) as e:
                await _post(c, "[[emu:error status=429]]")
            assert e.value.code == "insufficient_quota"
            assert "retry-after" not in e.value.response.headers
            # The account now cools for that model (retry_delay, 7 s by default) ...
            with pytest.raises(openai.RateLimitError):
                await _post(c, "plain")
            # ... but not for another model.
            assert await _post(c, "plain", "gemini-2.5-pro") == "plain"
            # Clearing it without waiting: disable, then enable the account.
            store = AccountStore(tmp_path / "accounts.json")
            acc = store.load()[0]
            for enabled in (False, True):
                store.set_enabled(acc.id, enabled)
                run.gateway.reload_accounts()
            assert await _post(c, "plain") == "plain"
            # limit=N: an ordinary, retryable 429 with Retry-After = retry_delay.
            with pytest.raises(openai.RateLimitError) as e:
                await _post(c, "[[emu:error status=429 limit=5 retry_delay=30s]]")
            assert e.value.code == "rate_limit_exceeded"
            assert e.value.response.headers["retry-after"] == "30"
