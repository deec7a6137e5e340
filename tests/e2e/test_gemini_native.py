"""The Gemini-native front end to end: the official google-genai SDK -> rawgate (real listener on
loopback) -> the emulator, on API-key and Code Assist accounts; bytes checked where the wire
matters (passthrough fidelity, stream framing, key stripping, the in-stream error)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from rawgate.accounts.store import AccountStore
from rawgate.emulator.server import DEMO_ACCOUNT
from tests.helpers_gateway import Running, gateway_stack

pytestmark = pytest.mark.anyio

TWO_KEYS = [("key-aaaaaaaaaaaaaaaaaaaaaaaa", "A"), ("key-bbbbbbbbbbbbbbbbbbbbbbbb", "B")]
KEY_A = TWO_KEYS[0][0]
MODEL = "gemini-2.5-flash"
CLIENT_KEY = "sk-client-secret-key"
STRICT = {"auth": {"mode": "strict", "api_keys": [CLIENT_KEY]}}


@asynccontextmanager
async def _sdk(
    run: Running, version: str = "v1", key: str = CLIENT_KEY
) -> AsyncIterator[genai.client.AsyncClient]:
    c = genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=run.origin,
            api_version=version,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
    try:
        yield c.aio
    finally:
        await c.aio.aclose()


def _upstream(run: Running, verb: str) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
    """The last request the emulator saw for `verb` (path, query, headers, body)."""
    for _m, path, query, headers, body in reversed(run.emulator.core.recent):
        if path.endswith(verb):
            return path, query, headers, body
    raise AssertionError(f"no upstream {verb}")


async def test_generate_stream_and_count_tokens_on_v1_and_v1beta(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, config=STRICT) as run:
        for version in ("v1", "v1beta"):
            async with _sdk(run, version) as c:
                r = await c.models.generate_content(model=MODEL, contents="hello native")
                assert r.text and "hello native" in r.text
                assert r.usage_metadata is not None and r.usage_metadata.prompt_token_count
                headers = r.sdk_http_response.headers if r.sdk_http_response else {}
                assert headers is not None and headers.get("x-mapped-model") == MODEL
                parts = [
                    ch.text or ""
                    async for ch in await c.models.generate_content_stream(
                        model=MODEL, contents="stream me please"
                    )
                ]
                assert "stream me please" in "".join(parts) and len(parts) >= 2
                n = await c.models.count_tokens(model=MODEL, contents="count these tokens")
                assert n.total_tokens and n.total_tokens > 0
        # The client's key stays with rawgate: the upstream saw the pool's key, no query key.
        _path, query, up_headers, _body = _upstream(run, ":generateContent")
        assert (b"x-goog-api-key", run.emulator.api_key.encode()) in up_headers
        assert CLIENT_KEY.encode() not in b"".join(v for _, v in up_headers) + query.encode()


async def test_body_forwarded_byte_for_byte_and_stream_framing(tmp_path: Path) -> None:
    body = (
        b'{"contents":[{"role":"user","parts":[{"text":"keep  me"}]}],'
        b'"generationConfig":{"thinkingConfig":{"thinking_budget":0}}}'
    )
    async with gateway_stack(tmp_path, config=STRICT) as run, httpx.AsyncClient() as http:
        url = f"{run.origin}/v1beta/models/{MODEL}:streamGenerateContent"
        r = await http.post(
            url + "?alt=sse&key=" + CLIENT_KEY,
            content=body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        events = r.content.split(b"\r\n\r\n")
        assert events[-1] == b"" and all(e.startswith(b"data: {") for e in events[:-1])
        assert b'"finishReason"' in events[-2]
        _path, query, headers, sent = _upstream(run, ":streamGenerateContent")
        assert sent == body and query == "alt=sse"
        assert CLIENT_KEY.encode() not in query.encode() + b"".join(v for _, v in headers)
        # Without alt=sse: Google's JSON array, element by element, with the same events.
        r2 = await http.post(url, content=body, headers={"x-goog-api-key": CLIENT_KEY})
        assert r2.status_code == 200 and r2.headers["content-type"] == "application/json"
        arr = orjson.loads(r2.content)
        assert [orjson.loads(e[6:]) for e in events[:-1]][-1]["candidates"] == arr[-1]["candidates"]
        assert r2.content.startswith(b"[{") and r2.content.endswith(b"\n]")


async def test_function_call_round_trip_keeps_the_thought_signature(tmp_path: Path) -> None:
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(
                name="get_weather",
                parameters_json_schema={
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                },
            )
        ]
    )
    cfg = types.GenerateContentConfig(tools=[tool])
    prompt = '[[emu:tool_call name=get_weather args={"city":"Paris"}]] weather?'
    async with gateway_stack(tmp_path) as run, _sdk(run) as c:
        r = await c.models.generate_content(
            model="gemini-3-flash-preview", contents=prompt, config=cfg
        )
        assert r.candidates and r.candidates[0].content and r.candidates[0].content.parts
        model_turn = r.candidates[0].content
        calls = [p for p in model_turn.parts or [] if p.function_call]
        assert calls and calls[0].function_call and calls[0].function_call.name == "get_weather"
        assert calls[0].thought_signature  # the signature reached the client intact
        history = [
            types.Content(role="user", parts=[types.Part(text=prompt)]),
            model_turn,
            types.Content(
                role="user",
                parts=[
                    types.Part.from_function_response(name="get_weather", response={"temp": 21})
                ],
            ),
        ]
        r2 = await c.models.generate_content(
            model="gemini-3-flash-preview", contents=history, config=cfg
        )
        assert r2.text and "received functionResponse(get_weather)" in r2.text
        # The signature went back upstream as the SDK sent it.
        _p, _q, _h, sent = _upstream(run, ":generateContent")
        sig = calls[0].thought_signature
        assert orjson.loads(sent)["contents"][1]["parts"][-1]["thoughtSignature"] == (
            base64.b64encode(sig).decode()
        )


async def test_embed_content_single_batch_and_model_listing(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _sdk(run) as c:
        one = await c.models.embed_content(model="gemini-embedding-001", contents="hello")
        assert one.embeddings and len(one.embeddings[0].values or []) == 3072
        many = await c.models.embed_content(
            model="gemini-embedding-001",
            contents=[f"doc {i}" for i in range(5)],
            config=types.EmbedContentConfig(output_dimensionality=768),
        )
        assert many.embeddings and [len(e.values or []) for e in many.embeddings] == [768] * 5
        names = [m.name async for m in await c.models.list()]
        assert "models/gemini-2.5-flash" in names and "models/gemini-embedding-001" in names
        got = await c.models.get(model="gemini-2.5-flash")
        assert got.name == "models/gemini-2.5-flash"
        with pytest.raises(errors.ClientError) as ei:
            await c.models.get(model="no-such-model")
        assert ei.value.code == 404 and ei.value.status == "NOT_FOUND"
    async with gateway_stack(tmp_path / "2") as run, httpx.AsyncClient() as http:
        # embedContent (single) passes through too; OpenAI clients still get OpenAI's listing.
        r = await http.post(
            f"{run.origin}/v1beta/models/gemini-embedding-001:embedContent",
            json={"content": {"parts": [{"text": "x"}]}},
        )
        assert r.status_code == 200 and len(r.json()["embedding"]["values"]) == 3072
        r = await http.get(f"{run.origin}/v1/models")
        assert r.json()["object"] == "list"


async def test_a_429_rotates_to_the_other_account(tmp_path: Path) -> None:
    cool_a = f"[[emu:error status=429 limit=5 retry_delay=2s for={KEY_A}]]"
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, _sdk(run) as c:
        for _ in range(2):  # whichever account starts, A answers 429 once and B answers
            r = await c.models.generate_content(model=MODEL, contents=cool_a + " hi")
            assert r.text and "hi" in r.text
            headers = r.sdk_http_response.headers if r.sdk_http_response else {}
            assert headers is not None and headers.get("x-account-email") == "B"
        assert run.emulator.stats.get("quota_429", 0) >= 1


async def test_errors_are_googles_and_the_sdks_own_types(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS, config=STRICT) as run:
        async with _sdk(run) as c:
            # Every account cooling: 429 RESOURCE_EXHAUSTED with RetryInfo (the upstream's delay).
            with pytest.raises(errors.ClientError) as ei:
                await c.models.generate_content(
                    model=MODEL, contents="[[emu:error status=429 retry_delay=12.5s limit=10]] x"
                )
            e = ei.value
            assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED"
            info = [d for d in e.details["error"]["details"] if "RetryInfo" in d["@type"]]
            delay = float(info[0]["retryDelay"].rstrip("s"))
            assert delay >= 12.5
            # A request the upstream refuses: 400 INVALID_ARGUMENT, Google's message kept.
            with pytest.raises(errors.ClientError) as ei:
                await c.models.generate_content(
                    model="gemini-2.5-pro", contents="[[emu:error status=400 message=bad-thing]]"
                )
            assert ei.value.code == 400 and "bad-thing" in (ei.value.message or "")
            # Not JSON: the app's own refusal in Google's shape.
        async with _sdk(run, key="sk-wrong") as bad:
            with pytest.raises(errors.ClientError) as ei:
                await bad.models.generate_content(model=MODEL, contents="x")
            assert ei.value.code == 400
            assert ei.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{run.origin}/v1beta/models/{MODEL}:generateContent",
                content=b"[1]",
                headers={"x-goog-api-key": CLIENT_KEY},
            )
            assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
            r = await http.post(
                f"{run.origin}/v1beta/models/{MODEL}:explode",
                content=b"{}",
                headers={"x-goog-api-key": CLIENT_KEY},
            )
            assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
            # No key at all: Google's 400, telling how Gemini clients send one.
            r = await http.post(f"{run.origin}/v1beta/models/{MODEL}:generateContent", json={})
            assert r.status_code == 400 and "x-goog-api-key" in r.json()["error"]["message"]
            # A Gemini base URL with a path: the 404 names the origin to use instead.
            r = await http.post(
                f"{run.origin}/v1/v1beta/models/{MODEL}:generateContent",
                content=b"{}",
                headers={"x-goog-api-key": CLIENT_KEY},
            )
            assert r.status_code == 404 and f"set it to {run.origin} " in r.text


async def test_a_stream_without_finish_reason_ends_in_googles_error(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as http:
        url = f"{run.origin}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
        body = {
            "contents": [{"role": "user", "parts": [{"text": "a b [[emu:quirk kind=no_finish]]"}]}]
        }
        r = await http.post(url, json=body)
        events = [e for e in r.content.split(b"\r\n\r\n") if e]
        assert len(events) >= 2 and b"finishReason" not in r.content
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == 503 and last["error"]["status"] == "UNAVAILABLE"
        async with _sdk(run) as c:
            with pytest.raises(errors.APIError) as ei:
                async for _ in await c.models.generate_content_stream(
                    model=MODEL, contents="a b [[emu:quirk kind=no_finish]]"
                ):
                    pass
            assert ei.value.code == 503


async def test_code_assist_account_answers_a_native_generate(tmp_path: Path) -> None:
    """Vector 3: the OAuth account's envelope is built around the client's bytes and the reply
    unwrapped; countTokens (no Code Assist route) is refused clearly when no API key exists."""
    AccountStore(tmp_path / "accounts.json").add_oauth(
        DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email
    )
    async with gateway_stack(tmp_path) as run, _sdk(run) as c:
        cfg = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=0))
        r = await c.models.generate_content(model=MODEL, contents="via code assist", config=cfg)
        assert r.text and "via code assist" in r.text
        headers = r.sdk_http_response.headers if r.sdk_http_response else {}
        assert headers is not None and headers.get("x-account-email") == DEMO_ACCOUNT.email
        _p, _q, up_headers, sent = _upstream(run, ":generateContent")
        env: dict[str, Any] = orjson.loads(sent)
        assert env["model"] == MODEL and env["project"] == DEMO_ACCOUNT.project
        assert "thinkingConfig" in env["request"]["generationConfig"]
        assert any(k == b"authorization" for k, _ in up_headers)
        assert not any(k == b"x-goog-api-key" for k, _ in up_headers)
        text = "".join(
            [
                ch.text or ""
                async for ch in await c.models.generate_content_stream(
                    model=MODEL, contents="streamed via code assist"
                )
            ]
        )
        assert "streamed via code assist" in text
        with pytest.raises(errors.ClientError) as ei:
            await c.models.count_tokens(model=MODEL, contents="x")
        assert ei.value.code == 400 and "API-key account" in (ei.value.message or "")


async def test_an_error_after_the_first_byte_is_told_in_stream_and_not_retried(
    tmp_path: Path,
) -> None:
    async with gateway_stack(tmp_path, api_keys=TWO_KEYS) as run, httpx.AsyncClient() as http:
        url = f"{run.origin}/v1beta/models/{MODEL}:streamGenerateContent"
        text = "one two three four [[emu:stream_error after=1 status=503]]"
        body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
        before = run.emulator.stats.get("requests", 0)
        r = await http.post(url + "?alt=sse", json=body)
        assert r.status_code == 200
        events = [e for e in r.content.split(b"\r\n\r\n") if e]
        assert b'"candidates"' in events[0]
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["status"] == "UNAVAILABLE"
        assert run.emulator.stats.get("requests", 0) == before + 1  # never after the first byte
        r = await http.post(url, json=body)  # the JSON-array form: the error is its last element
        arr = orjson.loads(r.content)
        assert "candidates" in arr[0] and arr[-1]["error"]["code"] == 503


async def test_both_client_keys_present_neither_forwarded(tmp_path: Path) -> None:
    """Vector 15: `?key=` and x-goog-api-key both present, a client-made functionCall id and a
    snake_case key in the body: the upstream gets the body byte-equal and the pool's key only."""
    body = (
        b'{"contents":[{"role":"user","parts":[{"text":"go"}]},{"role":"model","parts":[{"funct'
        b'ionCall":{"name":"run_shell_command","args":{"command":"ls"},"id":"run_shell_command_1'
        b'796522117618_0"},"thoughtSignature":"c2lnLWZha2U="}]},{"role":"user","parts":[{"functi'
        b'onResponse":{"name":"run_shell_command","id":"run_shell_command_1796522117618_0","resp'
        b'onse":{"output":"ok"}}}]}],"generationConfig":{"thinkingConfig":{"thinking_budget":0}}}'
    )
    async with gateway_stack(tmp_path, config=STRICT) as run, httpx.AsyncClient() as http:
        url = f"{run.origin}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse&key={CLIENT_KEY}"
        r = await http.post(url, content=body, headers={"x-goog-api-key": CLIENT_KEY})
        assert r.status_code == 200 and b'"finishReason":"STOP"' in r.content
        texts = [
            orjson.loads(e[6:])["candidates"][0]["content"]["parts"][0]["text"]
            for e in r.content.split(b"\r\n\r\n")
            if e.startswith(b"data: ") and b'"text"' in e
        ]
        assert "received functionResponse(run_shell_command)" in "".join(texts)
        _path, query, headers, sent = _upstream(run, ":streamGenerateContent")
        assert sent == body and query == "alt=sse"
        keys = [v for k, v in headers if k == b"x-goog-api-key"]
        assert keys == [run.emulator.api_key.encode()]


async def test_sticky_scheduling_keeps_a_native_conversation_on_one_account(
    tmp_path: Path,
) -> None:
    cfg = {"routing": {"scheduling": "sticky"}}
    async with (
        gateway_stack(tmp_path, api_keys=TWO_KEYS, config=cfg) as run,
        httpx.AsyncClient() as http,
    ):
        url = f"{run.origin}/v1beta/models/{MODEL}:generateContent"
        seen: dict[int, set[str]] = {}
        for conv in range(16):  # all 16 on one of 2 accounts by chance: p = 2^-15
            history: list[dict[str, Any]] = [
                {"role": "user", "parts": [{"text": f"conversation {conv} opens"}]}
            ]
            for turn in range(3):
                r = await http.post(url, json={"contents": history})
                assert r.status_code == 200
                seen.setdefault(conv, set()).add(r.headers["x-account-email"])
                history += [
                    r.json()["candidates"][0]["content"],
                    {"role": "user", "parts": [{"text": f"turn {turn}"}]},
                ]
        assert all(len(s) == 1 for s in seen.values())  # each conversation kept its account
        assert set().union(*seen.values()) == {"A", "B"}  # and they spread over the pool


async def test_count_tokens_and_embeddings_skip_code_assist_accounts(tmp_path: Path) -> None:
    store = AccountStore(tmp_path / "accounts.json")
    store.add_oauth(DEMO_ACCOUNT.refresh_token, email=DEMO_ACCOUNT.email)
    store.add_api_key(TWO_KEYS[0][0], label="A")
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient() as http:
        body = {"contents": [{"role": "user", "parts": [{"text": "count me"}]}]}
        served = set()
        for _ in range(4):  # round robin would alternate; these calls never reach OAuth
            r = await http.post(f"{run.origin}/v1beta/models/{MODEL}:countTokens", json=body)
            assert r.status_code == 200 and r.json()["totalTokens"] > 0
            served.add(r.headers["x-account-email"])
            r = await http.post(
                f"{run.origin}/v1/models/gemini-embedding-001:embedContent",
                json={"content": {"parts": [{"text": "x"}]}},
            )
            assert r.status_code == 200
            served.add(r.headers["x-account-email"])
        assert served == {"A"}
        generated = set()
        for _ in range(4):  # generate calls use both kinds
            r = await http.post(f"{run.origin}/v1beta/models/{MODEL}:generateContent", json=body)
            assert r.status_code == 200 and "candidates" in r.json()
            generated.add(r.headers["x-account-email"])
        assert generated == {"A", DEMO_ACCOUNT.email}


async def test_an_aliased_model_renames_the_models_the_body_repeats(tmp_path: Path) -> None:
    # Google (and the emulator) refuse a batchEmbedContents item whose `model` differs from the
    # URL's: when the router renames the URL model, the items that named it follow.
    mapping = {"routing": {"custom_mapping": {"my-embedder": "gemini-embedding-001",
                                              "my-flash": MODEL}}}
    async with gateway_stack(tmp_path, config=mapping) as run:
        async with _sdk(run) as c:
            texts = [f"aliased doc {i}" for i in range(7)]
            got = await c.models.embed_content(
                model="my-embedder",
                contents=texts,
                config=types.EmbedContentConfig(output_dimensionality=64),
            )
            assert got.embeddings and len(got.embeddings) == 7
            direct = await c.models.embed_content(model="gemini-embedding-001", contents=texts,
                                                  config=types.EmbedContentConfig(
                                                      output_dimensionality=64))
            assert direct.embeddings
            assert [e.values for e in got.embeddings] == [e.values for e in direct.embeddings]
            n = await c.models.count_tokens(model="my-flash", contents="count me")
            assert n.total_tokens and n.total_tokens > 0
        async with httpx.AsyncClient() as http:
            # In bytes: only the item models that named the alias change, spacing kept.
            body = (
                b'{"requests": [ {"model" : "models/my-embedder", "content": {"parts": '
                b'[{"text": "say \\"models/my-embedder\\""}]}, "outputDimensionality": 8},'
                b' {"content": {"parts": [{"text": "b"}]}, "model":"models/my-embedder"} ]}'
            )
            r = await http.post(
                f"{run.origin}/v1beta/models/my-embedder:batchEmbedContents", content=body
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-mapped-model"] == "gemini-embedding-001"
            assert [len(e["values"]) for e in r.json()["embeddings"]] == [8, 3072]
            path, _q, _h, sent = _upstream(run, ":batchEmbedContents")
            assert path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
            assert sent == body.replace(
                b'"models/my-embedder"}', b'"models/gemini-embedding-001"}'
            ).replace(b'"model" : "models/my-embedder"', b'"model" : "models/gemini-embedding-001"')
            # An item naming a third model is the client's mistake: Google's own 400, as sent.
            bad = b'{"requests":[{"model":"models/other","content":{"parts":[{"text":"c"}]}}]}'
            r = await http.post(
                f"{run.origin}/v1beta/models/my-embedder:batchEmbedContents", content=bad
            )
            assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
            assert _upstream(run, ":batchEmbedContents")[3] == bad
            # Bytes that are not UTF-8 get Google's 400 (the emulator's), never a 500.
            r = await http.post(
                f"{run.origin}/v1beta/models/my-embedder:batchEmbedContents",
                content=b'{"requests":[{"\xff":1,"model":"\xfe","content":"\xff"}]}',
            )
            assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
            # countTokens' generateContentRequest.model and embedContent's model follow too.
            ct = (
                b'{"generateContentRequest": {"model": "models/my-flash", "contents": '
                b'[{"role": "user", "parts": [{"text": "hi"}]}]}}'
            )
            r = await http.post(f"{run.origin}/v1beta/models/my-flash:countTokens", content=ct)
            assert r.status_code == 200 and r.json()["totalTokens"] > 0
            assert _upstream(run, ":countTokens")[3] == ct.replace(
                b"models/my-flash", b"models/gemini-2.5-flash"
            )
            one = b'{"model": "models/my-embedder", "content": {"parts": [{"text": "x"}]}}'
            r = await http.post(f"{run.origin}/v1/models/my-embedder:embedContent", content=one)
            assert r.status_code == 200 and len(r.json()["embedding"]["values"]) == 3072
            assert _upstream(run, ":embedContent")[3] == one.replace(
                b"my-embedder", b"gemini-embedding-001"
            )
