"""The emulator App in memory: routes, reply shapes, directives, auth, quotas, OAuth, Code Assist.

Everything goes through rawgate's request seam (make_request + RecordingSink), in bytes.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from rawgate.emulator.server import (
    DEMO_ACCOUNT,
    DEMO_API_KEY,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    ConnectionCut,
    Emulator,
    EmulatorApp,
    OAuthAccount,
    Settings,
)
from tests.helpers_app import RecordingSink, call, make_request

pytestmark = pytest.mark.anyio

KEY = [("x-goog-api-key", DEMO_API_KEY), ("content-type", "application/json")]
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
SSE = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
ARRAY = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def user(text: str, **extra: Any) -> bytes:
    return orjson.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}], **extra})


def sse_events(sink: RecordingSink) -> list[dict[str, Any]]:
    body = sink.body
    assert body.endswith(b"\r\n\r\n") and b"[DONE]" not in body
    frames = body.split(b"\r\n\r\n")[:-1]
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames)
    return [orjson.loads(f[len(b"data: "):]) for f in frames]


def text_of(resp: dict[str, Any], cand: int = 0) -> str:
    parts = resp["candidates"][cand].get("content", {}).get("parts", [])
    return "".join(p.get("text", "") for p in parts if not p.get("thought"))


async def gen(app: EmulatorApp, text: str, path: str = GEN, **extra: Any) -> RecordingSink:
    return await call(app, "POST", path, KEY, user(text, **extra))


@pytest.fixture
def app() -> EmulatorApp:
    return EmulatorApp(Emulator())


# ---- default replies --------------------------------------------------------------------------


async def test_unary_echo_exact_bytes(app: EmulatorApp) -> None:
    s = await gen(app, "Hello there, emulator!")
    assert s.status == 200
    assert s.header("content-type") == b"application/json; charset=UTF-8"
    assert s.body == (
        b'{"candidates":[{"content":{"parts":[{"text":"Hello there, emulator!"}],"role":"model"},'
        b'"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":6,'
        b'"candidatesTokenCount":6,"totalTokenCount":20,"promptTokensDetails":[{"modality":'
        b'"TEXT","tokenCount":6}],"thoughtsTokenCount":8},"modelVersion":"gemini-2.5-flash",'
        b'"responseId":"emu-1"}'
    )


async def test_sse_stream_chunks_and_running_usage(app: EmulatorApp) -> None:
    s = await gen(app, "one two three four five six", SSE)
    assert s.status == 200 and s.header("content-type") == b"text/event-stream"
    assert len(s.chunks) == 3  # one body piece per event: the stream is written chunk by chunk
    events = sse_events(s)
    assert "".join(text_of(e) for e in events) == "one two three four five six"
    counts = [e["usageMetadata"]["candidatesTokenCount"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 7  # running totals, not deltas
    assert [e["candidates"][0].get("finishReason") for e in events] == [None, None, "STOP"]
    assert len({e["responseId"] for e in events}) == 1
    last = events[-1]["usageMetadata"]
    assert last["totalTokenCount"] == (last["promptTokenCount"] + last["candidatesTokenCount"]
                                       + last["thoughtsTokenCount"])


async def test_non_alt_stream_is_a_json_array(app: EmulatorApp) -> None:
    s = await gen(app, "array please", ARRAY)
    assert s.header("content-type") == b"application/json; charset=UTF-8"
    items = orjson.loads(s.body)
    assert isinstance(items, list) and len(items) == 3
    assert "".join(text_of(e) for e in items) == "array please"


async def test_response_ids_differ_per_request_even_when_memoised(app: EmulatorApp) -> None:
    a = (await gen(app, "same")).json()
    b = (await gen(app, "same")).json()
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["responseId"] != b["responseId"]
    a.pop("responseId")
    b.pop("responseId")
    assert a == b


async def test_non_thinking_model_reports_no_thoughts(app: EmulatorApp) -> None:
    s = await gen(app, "hi", "/v1/models/gemini-2.0-flash:generateContent")
    r = s.json()
    assert isinstance(r, dict) and "thoughtsTokenCount" not in r["usageMetadata"]


async def test_include_thoughts_streams_a_thought_part_first(app: EmulatorApp) -> None:
    cfg = {"generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    events = sse_events(await gen(app, "think", SSE, **cfg))
    first = events[0]["candidates"][0]["content"]["parts"][0]
    assert first["thought"] is True and first["text"]
    assert events[0]["usageMetadata"]["thoughtsTokenCount"] > 0


async def test_function_response_turn_is_described(app: EmulatorApp) -> None:
    body = orjson.dumps({"contents": [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "w", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "w", "response": {"t": 1}}}]},
    ]})
    s = await call(app, "POST", GEN, KEY, body)
    r = s.json()
    assert isinstance(r, dict) and text_of(r) == "received functionResponse(w)"


# ---- directives -------------------------------------------------------------------------------


async def test_reply_text_and_size(app: EmulatorApp) -> None:
    r = (await gen(app, 'x [[emu:reply text="Bonjour"]]')).json()
    assert isinstance(r, dict) and text_of(r) == "Bonjour"
    r = (await gen(app, "[[emu:reply chars=1000]]")).json()
    assert isinstance(r, dict) and len(text_of(r)) == 1000


async def test_echo_request_returns_what_was_sent(app: EmulatorApp) -> None:
    r = (await gen(app, "[[emu:echo_request]]", generationConfig={"temperature": 0.5})).json()
    assert isinstance(r, dict)
    sent = orjson.loads(text_of(r))
    assert sent["generationConfig"] == {"temperature": 0.5}


async def test_tool_calls_parallel_with_signature_on_first_only(app: EmulatorApp) -> None:
    prompt = ('[[emu:tool_call name=get_weather args={"city":"Paris"}]] '
              '[[emu:tool_call name=get_weather args={"city":"Rome"} id=c2]]')
    r = (await gen(app, prompt)).json()
    assert isinstance(r, dict)
    parts = r["candidates"][0]["content"]["parts"]
    assert [p["functionCall"]["args"]["city"] for p in parts] == ["Paris", "Rome"]
    assert base64.b64decode(parts[0]["thoughtSignature"]).startswith(b"emu-sig:")
    assert "thoughtSignature" not in parts[1] and parts[1]["functionCall"]["id"] == "c2"
    assert r["candidates"][0]["finishReason"] == "STOP"  # a call turn ends with STOP


async def test_tool_call_signature_none_and_custom(app: EmulatorApp) -> None:
    r = (await gen(app, "[[emu:tool_call name=a signature=none]]")).json()
    assert isinstance(r, dict) and "thoughtSignature" not in r["candidates"][0]["content"][
        "parts"][0]
    r = (await gen(app, "[[emu:tool_call name=a signature=c2ln]]")).json()
    assert isinstance(r, dict)
    assert r["candidates"][0]["content"]["parts"][0]["thoughtSignature"] == "c2ln"


async def test_tool_call_streams_as_one_complete_chunk(app: EmulatorApp) -> None:
    events = sse_events(await gen(app, '[[emu:reply text=ok]] [[emu:tool_call name=f '
                                       'args={"a":[[1]]}]]', SSE))
    call_chunks = [e for e in events if "functionCall" in e["candidates"][0]["content"][
        "parts"][0]]
    assert len(call_chunks) == 1 and call_chunks[0] is events[-1]
    assert call_chunks[0]["candidates"][0]["content"]["parts"][0]["functionCall"]["args"] == {
        "a": [[1]]}


async def test_thought_directive_with_signature(app: EmulatorApp) -> None:
    r = (await gen(app, '[[emu:thought text="hmm" signature=c2ln]] answer')).json()
    assert isinstance(r, dict)
    parts = r["candidates"][0]["content"]["parts"]
    assert parts[0] == {"text": "hmm", "thought": True}
    assert parts[1] == {"text": "answer", "thoughtSignature": "c2ln"}


async def test_finish_max_tokens_and_malformed_call(app: EmulatorApp) -> None:
    r = (await gen(app, "[[emu:finish reason=MAX_TOKENS]] cut")).json()
    assert isinstance(r, dict) and r["candidates"][0]["finishReason"] == "MAX_TOKENS"
    r = (await gen(app, "[[emu:finish reason=MALFORMED_FUNCTION_CALL]]")).json()
    assert isinstance(r, dict)
    cand = r["candidates"][0]
    assert "content" not in cand and cand["finishReason"] == "MALFORMED_FUNCTION_CALL"
    assert cand["finishMessage"].startswith("Malformed function call")


async def test_safety_finish_ends_with_an_empty_blocked_chunk(app: EmulatorApp) -> None:
    events = sse_events(await gen(app, "some text [[emu:finish reason=SAFETY]]", SSE))
    last = events[-1]["candidates"][0]
    assert last["finishReason"] == "SAFETY" and "content" not in last
    assert last["safetyRatings"][0]["blocked"] is True
    assert all("finishReason" not in e["candidates"][0] for e in events[:-1])


async def test_prompt_block_has_no_candidates(app: EmulatorApp) -> None:
    events = sse_events(await gen(app, "[[emu:block reason=SAFETY]]", SSE))
    assert len(events) == 1 and "candidates" not in events[0]
    assert events[0]["promptFeedback"]["blockReason"] == "SAFETY"


async def test_error_429_with_retry_info_and_quota_failure(app: EmulatorApp) -> None:
    s = await gen(app, "[[emu:error status=429 retry_delay=3.5s]]")
    assert s.status == 429
    err = s.json()["error"]  # type: ignore[index]
    assert err["status"] == "RESOURCE_EXHAUSTED" and "Please retry in 3.5s" in err["message"]
    types = [d["@type"].rsplit(".", 1)[1] for d in err["details"]]
    assert types == ["QuotaFailure", "Help", "RetryInfo"]
    assert err["details"][-1]["retryDelay"] == "3.5s"


@pytest.mark.parametrize(("status", "name"), [(500, "INTERNAL"), (503, "UNAVAILABLE"),
                                              (400, "INVALID_ARGUMENT"), (504,
                                                                          "DEADLINE_EXCEEDED")])
async def test_error_statuses(app: EmulatorApp, status: int, name: str) -> None:
    s = await gen(app, f"[[emu:error status={status}]]")
    assert s.status == status
    assert s.json() == {"error": {"code": status, "message": s.json()["error"]["message"],  # type: ignore[index]
                                  "status": name}}


async def test_error_on_stream_route_without_alt_is_array_wrapped(app: EmulatorApp) -> None:
    s = await gen(app, "[[emu:error status=503]]", ARRAY)
    body = s.json()
    assert s.status == 503 and isinstance(body, list) and body[0]["error"]["code"] == 503


async def test_error_html_reason_and_message(app: EmulatorApp) -> None:
    s = await gen(app, "[[emu:error status=502 html=true]]")
    assert s.status == 502 and s.header("content-type").startswith(b"text/html")  # type: ignore[union-attr]
    s = await gen(app, '[[emu:error status=503 reason=MODEL_CAPACITY_EXHAUSTED message="busy"]]')
    err = s.json()["error"]  # type: ignore[index]
    assert err["message"] == "busy" and err["details"][0]["reason"] == "MODEL_CAPACITY_EXHAUSTED"


async def test_error_times_fires_n_times_then_succeeds(app: EmulatorApp) -> None:
    statuses = [(await gen(app, "flaky [[emu:error status=503 times=2]]")).status
                for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    # another prompt with the same directive has its own counter
    assert (await gen(app, "other [[emu:error status=503 times=2]]")).status == 503


async def test_error_for_one_credential_only() -> None:
    app = EmulatorApp(Emulator(Settings(api_keys=("key-a", "key-b"))))
    body = user("[[emu:error status=429 for=key-a]]")
    a = await call(app, "POST", GEN, [("x-goog-api-key", "key-a")], body)
    b = await call(app, "POST", GEN, [("x-goog-api-key", "key-b")], body)
    assert (a.status, b.status) == (429, 200)


async def test_stream_error_after_k_chunks_is_raw_json(app: EmulatorApp) -> None:
    s = await gen(app, "aaa bbb ccc [[emu:stream_error after=1 status=503]]", SSE)
    assert s.status == 200 and len(s.chunks) == 2
    assert s.chunks[0].startswith(b"data: ")
    raw = s.chunks[1]
    assert not raw.startswith(b"data:") and raw.startswith(b"{\n")  # pretty-printed, no prefix
    assert orjson.loads(raw)["error"]["status"] == "UNAVAILABLE"


async def test_stream_error_in_json_array_mode(app: EmulatorApp) -> None:
    s = await gen(app, "aaa bbb ccc [[emu:stream_error after=2]]", ARRAY)
    items = orjson.loads(s.body)
    assert len(items) == 3 and items[-1]["error"]["code"] == 503


async def test_drop_after_k_chunks_cuts_the_connection(app: EmulatorApp) -> None:
    sink = RecordingSink()
    req = make_request("POST", SSE, KEY, user("a b c d e f [[emu:drop after=2]]"))
    with pytest.raises(ConnectionCut):
        await app(req, sink)
    assert sink.started and not sink.ended and len(sink.chunks) == 2


async def test_reset_cuts_before_the_head(app: EmulatorApp) -> None:
    sink = RecordingSink()
    with pytest.raises(ConnectionCut):
        await app(make_request("POST", GEN, KEY, user("[[emu:reset]]")), sink)
    assert not sink.started


@pytest.mark.parametrize("directive", ["[[emu:stall after=1]]", "[[emu:hang]]"])
async def test_stall_and_hang_end_after_stall_max(directive: str) -> None:
    app = EmulatorApp(Emulator(Settings(stall_max_s=0.01)))
    sink = RecordingSink()
    with pytest.raises(ConnectionCut):
        await app(make_request("POST", SSE, KEY, user("a b c " + directive)), sink)
    assert len(sink.chunks) == (1 if "stall" in directive else 0) and not sink.ended


async def test_client_going_away_mid_stream_is_counted(app: EmulatorApp) -> None:
    from rawgate.seam import ClientDisconnected

    sink = RecordingSink(disconnect_after=1)
    with pytest.raises(ClientDisconnected):
        await app(make_request("POST", SSE, KEY, user("a b c")), sink)
    assert app.core.stats["streams_cancelled"] == 1


async def test_chunks_chunk_chars_delay_and_drip(app: EmulatorApp) -> None:
    events = sse_events(await gen(app, "abcdefghij [[emu:chunks n=5]]", SSE))
    assert [text_of(e) for e in events] == ["ab", "cd", "ef", "gh", "ij"]
    events = sse_events(await gen(app, "abcdefghij [[emu:chunk_chars n=4]]", SSE))
    assert [text_of(e) for e in events] == ["abcd", "efgh", "ij"]
    s = await gen(app, "ab [[emu:delay ms=1]] [[emu:first_byte ms=1]]", SSE)
    assert len(sse_events(s)) == 2
    s = await gen(app, "ab [[emu:chunks n=1]] [[emu:drip ms=0.01]]", SSE)
    assert len(s.chunks) == len(s.body) and all(len(c) == 1 for c in s.chunks)


@pytest.mark.parametrize("prompt", ["[[emu:nope]]", "[[emu:reply colour=red]]",
                                    "[[emu:chunks n=0]]", "[[emu:reply text=x", "[[emu:finish "
                                    "reason=DONE]]", '[[emu:tool_call args={"a":1}]]',
                                    "[[emu:delay ms=fast]]", "[[emu:stream_error status=200]]"])
async def test_bad_directives_are_400s_naming_them(app: EmulatorApp, prompt: str) -> None:
    s = await gen(app, prompt)
    assert s.status == 400
    assert s.json()["error"]["message"].startswith("emulator directive")  # type: ignore[index]


async def test_directive_in_system_instruction_applies(app: EmulatorApp) -> None:
    body = orjson.dumps({"systemInstruction": {"parts": [{"text": "[[emu:reply text=sys]]"}]},
                         "contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    r = (await call(app, "POST", GEN, KEY, body)).json()
    assert isinstance(r, dict) and text_of(r) == "sys"


async def test_directives_of_earlier_turns_do_not_fire_again(app: EmulatorApp) -> None:
    body = orjson.dumps({"contents": [
        {"role": "user", "parts": [{"text": "[[emu:error status=500]]"}]},
        {"role": "model", "parts": [{"text": "ok"}]},
        {"role": "user", "parts": [{"text": "fine now"}]},
    ]})
    assert (await call(app, "POST", GEN, KEY, body)).status == 200


# ---- generationConfig -------------------------------------------------------------------------


async def test_max_output_tokens_truncates(app: EmulatorApp) -> None:
    r = (await gen(app, "x" * 100, generationConfig={"maxOutputTokens": 5})).json()
    assert isinstance(r, dict)
    assert text_of(r) == "x" * 20 and r["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert r["usageMetadata"]["candidatesTokenCount"] == 5


async def test_candidate_count_and_stop_sequences(app: EmulatorApp) -> None:
    r = (await gen(app, "keep###drop", generationConfig={"candidateCount": 2,
                                                         "stopSequences": ["###"]})).json()
    assert isinstance(r, dict)
    assert [c["index"] for c in r["candidates"]] == [0, 1]
    assert text_of(r, 0) == text_of(r, 1) == "keep"


async def test_json_mode_follows_the_schema(app: EmulatorApp) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "n": {"type": "integer"},
                                               "tags": {"type": "array",
                                                        "items": {"type": "string"}}}}
    r = (await gen(app, "Ada", generationConfig={"responseMimeType": "application/json",
                                                 "responseJsonSchema": schema})).json()
    assert isinstance(r, dict)
    assert orjson.loads(text_of(r)) == {"name": "Ada", "n": 0, "tags": ["Ada"]}
    r = (await gen(app, "Ada", generationConfig={"responseMimeType": "application/json"})).json()
    assert isinstance(r, dict) and orjson.loads(text_of(r)) == {"echo": "Ada"}
    r = (await gen(app, "Ada", generationConfig={"responseMimeType": "text/x.enum",
                                                 "responseSchema": {"type": "STRING",
                                                                    "enum": ["b", "c"]}})).json()
    assert isinstance(r, dict) and text_of(r) == "b"


# ---- auth, models, routes ---------------------------------------------------------------------


async def test_missing_key_is_403_and_wrong_key_400(app: EmulatorApp) -> None:
    s = await call(app, "POST", GEN, [], user("x"))
    assert s.status == 403 and s.json()["error"]["status"] == "PERMISSION_DENIED"  # type: ignore[index]
    s = await call(app, "POST", GEN, [("x-goog-api-key", "AIzaWrong")], user("x"))
    err = s.json()["error"]  # type: ignore[index]
    assert s.status == 400 and err["details"][0]["reason"] == "API_KEY_INVALID"
    assert "AIzaWrong" not in s.body.decode()
    s = await call(app, "POST", GEN + "?key=" + DEMO_API_KEY, [], user("x"))
    assert s.status == 200


async def test_models_list_pages_and_get(app: EmulatorApp) -> None:
    names: list[str] = []
    token = ""
    for _ in range(20):
        s = await call(app, "GET", "/v1beta/models?pageSize=4" + token, KEY)
        page = s.json()
        assert isinstance(page, dict) and len(page["models"]) <= 4
        names += [m["name"] for m in page["models"]]
        if "nextPageToken" not in page:
            break
        token = "&pageToken=" + page["nextPageToken"]
    assert "models/gemini-2.5-flash" in names and len(names) == len(set(names)) >= 8
    m = (await call(app, "GET", "/v1beta/models/gemini-2.5-pro", KEY)).json()
    assert isinstance(m, dict) and m["name"] == "models/gemini-2.5-pro" and m["thinking"]
    assert "generateContent" in m["supportedGenerationMethods"]


async def test_unknown_model_is_googles_404(app: EmulatorApp) -> None:
    s = await call(app, "POST", "/v1beta/models/gpt-4o:generateContent", KEY, user("x"))
    err = s.json()["error"]  # type: ignore[index]
    assert s.status == 404 and err["status"] == "NOT_FOUND"
    assert err["message"].startswith("models/gpt-4o is not found for API version v1beta")


@pytest.mark.parametrize(("method", "target"), [("GET", "/v2/models"), ("GET", GEN),
                                                ("POST", "/v1beta/models/m:embed"),
                                                ("GET", "/v1internal:loadCodeAssist")])
async def test_unrouted_requests_get_the_html_404(app: EmulatorApp, method: str,
                                                  target: str) -> None:
    s = await call(app, method, target, KEY)
    assert s.status == 404 and s.header("content-type").startswith(b"text/html")  # type: ignore[union-attr]


async def test_count_tokens(app: EmulatorApp) -> None:
    path = "/v1beta/models/gemini-2.5-flash:countTokens"
    s = await call(app, "POST", path, KEY, orjson.dumps({"contents": [
        {"role": "user", "parts": [{"text": "12345678"}]}]}))
    assert s.json() == {"totalTokens": 2,
                        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2}]}
    s = await call(app, "POST", path, KEY, orjson.dumps({"generateContentRequest": {
        "model": "models/gemini-2.5-flash", "contents": [{"parts": [{"text": "1234"}]}]}}))
    assert s.json()["totalTokens"] == 1  # type: ignore[index]


async def test_invalid_json_is_400(app: EmulatorApp) -> None:
    s = await call(app, "POST", GEN, KEY, b"{not json")
    assert s.status == 400 and "Invalid JSON payload" in s.json()["error"]["message"]  # type: ignore[index]


# ---- quotas -----------------------------------------------------------------------------------


async def test_quota_window_then_429_with_retry_delay_then_reset() -> None:
    core = Emulator(Settings(quota_requests=2, quota_window_s=60))
    app = EmulatorApp(core)
    assert [(await gen(app, "q")).status for _ in range(3)] == [200, 200, 429]
    s = await gen(app, "q")
    err = s.json()["error"]  # type: ignore[index]
    assert "limit: 2" in err["message"]
    delay = float(err["details"][-1]["retryDelay"].removesuffix("s"))
    assert 0 < delay <= 60
    core.advance(61)
    assert (await gen(app, "q")).status == 200
    assert (await gen(app, "q")).status == 200 and (await gen(app, "q")).status == 429
    core.reset_quotas()
    assert (await gen(app, "q")).status == 200


async def test_quotas_are_per_key_and_zero_means_none() -> None:
    app = EmulatorApp(Emulator(Settings(api_keys=("a", "b", "c"), quota_requests=1,
                                        key_quotas={"c": 0})))

    async def status(key: str) -> int:
        return (await call(app, "POST", GEN, [("x-goog-api-key", key)], user("x"))).status

    assert [await status("a"), await status("a"), await status("b"), await status("c")] == [
        200, 429, 200, 429]


async def test_invalid_requests_do_not_consume_quota() -> None:
    app = EmulatorApp(Emulator(Settings(quota_requests=1)))
    bad = orjson.dumps({"contents": []})
    assert (await call(app, "POST", GEN, KEY, bad)).status == 400
    assert (await gen(app, "x")).status == 200


# ---- OAuth and Code Assist --------------------------------------------------------------------


def token_form(**over: str) -> bytes:
    form = {"grant_type": "refresh_token", "refresh_token": DEMO_ACCOUNT.refresh_token,
            "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET, **over}
    return "&".join(f"{k}={v}" for k, v in form.items()).encode()


FORM = [("content-type", "application/x-www-form-urlencoded")]


async def access_token(app: EmulatorApp) -> str:
    s = await call(app, "POST", "/token", FORM, token_form())
    r = s.json()
    assert s.status == 200 and isinstance(r, dict)
    assert r["token_type"] == "Bearer" and r["expires_in"] == 3599
    return str(r["access_token"])


def envelope(text: str, project: str = DEMO_ACCOUNT.project, **extra: Any) -> bytes:
    return orjson.dumps({"model": "gemini-2.5-pro", "project": project, "user_prompt_id": "p1",
                         "request": {"contents": [{"role": "user", "parts": [{"text": text}]}],
                                     "session_id": "s1"}, **extra})


async def test_code_assist_generate_and_stream(app: EmulatorApp) -> None:
    bearer = [("authorization", "Bearer " + await access_token(app))]
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("hi CA"))
    r = s.json()
    assert s.status == 200 and isinstance(r, dict)
    assert set(r) == {"response", "traceId"} and text_of(r["response"]) == "hi CA"
    assert r["response"]["responseId"] == r["traceId"]
    s = await call(app, "POST", "/v1internal:streamGenerateContent?alt=sse", bearer,
                   envelope("streamed text"))
    events = sse_events(s)
    assert all(set(e) == {"response", "traceId"} for e in events)
    assert "".join(text_of(e["response"]) for e in events) == "streamed text"


async def test_code_assist_errors(app: EmulatorApp) -> None:
    bearer = [("authorization", "Bearer " + await access_token(app))]
    s = await call(app, "POST", "/v1internal:generateContent", [], envelope("x"))
    assert s.status == 401 and s.json()["error"]["status"] == "UNAUTHENTICATED"  # type: ignore[index]
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("x", "other"))
    assert s.status == 403
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("x", bogus=1))
    assert s.status == 400 and '"bogus"' in s.json()["error"]["message"]  # type: ignore[index]
    s = await call(app, "POST", "/v1internal:streamGenerateContent?alt=sse", bearer,
                   envelope("[[emu:error status=429 retry_delay=2s]]"))
    body = s.json()
    assert s.status == 429 and isinstance(body, list)  # array-wrapped on Code Assist streams
    err = body[0]["error"]
    assert "reset after 2s" in err["message"]
    assert [d.get("reason") for d in err["details"]] == ["RATE_LIMIT_EXCEEDED", None]


async def test_code_assist_count_tokens(app: EmulatorApp) -> None:
    bearer = [("authorization", "Bearer " + await access_token(app))]
    body = orjson.dumps({"request": {"model": "models/gemini-2.5-flash",
                                     "contents": [{"role": "user", "parts": [{"text": "abcd"}]}]}})
    s = await call(app, "POST", "/v1internal:countTokens", bearer, body)
    assert s.json() == {"totalTokens": 1}


async def test_load_code_assist_and_onboarding() -> None:
    fresh = OAuthAccount("new@rawgate.invalid", "1//fresh", "emu-new", onboarded=False)
    app = EmulatorApp(Emulator(Settings(oauth_accounts=(fresh,))))
    s = await call(app, "POST", "/token", FORM, token_form(refresh_token="1//fresh"))
    bearer = [("authorization", "Bearer " + s.json()["access_token"])]  # type: ignore[index]
    load = {"metadata": {"ideType": "IDE_UNSPECIFIED", "pluginType": "GEMINI"}}
    r = (await call(app, "POST", "/v1internal:loadCodeAssist", bearer, orjson.dumps(load))).json()
    assert isinstance(r, dict) and "currentTier" not in r
    assert next(t for t in r["allowedTiers"] if t.get("isDefault"))["id"] == "free-tier"
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("x", "emu-new"))
    assert s.status == 403  # not onboarded yet
    s = await call(app, "POST", "/v1internal:onboardUser", bearer,
                   orjson.dumps({"tierId": "free-tier", "cloudaicompanionProject": "p"}))
    assert s.status == 400  # a project on a free-tier onboard: precondition failure
    s = await call(app, "POST", "/v1internal:onboardUser", bearer,
                   orjson.dumps({"tierId": "free-tier"}))
    op = s.json()
    assert isinstance(op, dict) and op["done"] is True
    assert op["response"]["cloudaicompanionProject"]["id"] == "emu-new"
    r = (await call(app, "POST", "/v1internal:loadCodeAssist", bearer, orjson.dumps(load))).json()
    assert isinstance(r, dict) and r["currentTier"]["id"] == "free-tier"
    assert r["cloudaicompanionProject"] == "emu-new"
    assert (await call(app, "POST", "/v1internal:generateContent", bearer,
                       envelope("x", "emu-new"))).status == 200


@pytest.mark.parametrize(("over", "status", "error"), [
    ({"grant_type": "password"}, 400, "unsupported_grant_type"),
    ({"client_secret": "nope"}, 401, "invalid_client"),
    ({"refresh_token": "1//unknown"}, 400, "invalid_grant"),
    ({"refresh_token": ""}, 400, "invalid_request"),
])
async def test_token_endpoint_errors(app: EmulatorApp, over: dict[str, str], status: int,
                                     error: str) -> None:
    s = await call(app, "POST", "/token", FORM, token_form(**over))
    assert s.status == status and s.json()["error"] == error  # type: ignore[index]


async def test_token_endpoint_accepts_json(app: EmulatorApp) -> None:
    body = orjson.dumps({"grant_type": "refresh_token", "refresh_token": DEMO_ACCOUNT.refresh_token,
                         "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET})
    s = await call(app, "POST", "/token", [("content-type", "application/json")], body)
    assert s.status == 200


async def test_revoked_refresh_token_and_its_access_tokens_die(app: EmulatorApp) -> None:
    bearer = [("authorization", "Bearer " + await access_token(app))]
    assert (await call(app, "POST", "/v1internal:generateContent", bearer,
                       envelope("x"))).status == 200
    app.core.revoke(DEMO_ACCOUNT.refresh_token)
    s = await call(app, "POST", "/token", FORM, token_form())
    assert s.status == 400 and s.json() == {
        "error": "invalid_grant", "error_description": "Token has been expired or revoked."}
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("x"))
    assert s.status == 401


async def test_access_tokens_expire() -> None:
    app = EmulatorApp(Emulator(Settings(access_token_lifetime_s=10)))
    s = await call(app, "POST", "/token", FORM, token_form())
    assert s.json()["expires_in"] == 10  # type: ignore[index]
    bearer = [("authorization", "Bearer " + s.json()["access_token"])]  # type: ignore[index]
    assert (await call(app, "POST", "/v1internal:generateContent", bearer,
                       envelope("x"))).status == 200
    app.core.advance(10)
    s = await call(app, "POST", "/v1internal:generateContent", bearer, envelope("x"))
    assert s.status == 401
    assert s.json()["error"]["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"  # type: ignore[index]


async def test_bearer_token_works_on_the_developer_api(app: EmulatorApp) -> None:
    bearer = [("authorization", "Bearer " + await access_token(app))]
    assert (await call(app, "POST", GEN, bearer, user("x"))).status == 200


async def test_recent_requests_are_kept_for_inspection(app: EmulatorApp) -> None:
    await gen(app, "look at me")
    method, path, _query, headers, body = app.core.recent[-1]
    assert (method, path) == ("POST", GEN.split("?")[0]) and b"look at me" in body
    assert (b"x-goog-api-key", DEMO_API_KEY.encode()) in headers


@pytest.mark.parametrize(("kind", "check"), [
    ("lf", lambda b: b"\r" not in b and b.count(b"\n\n") == 3),
    ("keepalive", lambda b: b.count(b": keepalive\r\n\r\n") == 3),
    ("done", lambda b: b.endswith(b"data: [DONE]\r\n\r\n")),
    ("bad_json", lambda b: b"data: {not json\r\n\r\n" in b),
    ("multiline", lambda b: b'data: {\r\ndata:   "candidates": [\r\n' in b),
    ("event_lines", lambda b: b.count(b"event: message\r\nid: 1\r\n") == 3),
    ("non_utf8", lambda b: b"\xff\xfe" in b),
    ("no_finish", lambda b: b"finishReason" not in b and b.count(b"data: ") == 3),
])
async def test_sse_quirks(app: EmulatorApp, kind: str, check: Any) -> None:
    s = await gen(app, f"abc def [[emu:quirk kind={kind}]]", SSE)
    assert s.status == 200 and check(s.body), s.body


async def test_unknown_quirk_is_a_400(app: EmulatorApp) -> None:
    assert (await gen(app, "[[emu:quirk kind=weird]]", SSE)).status == 400
