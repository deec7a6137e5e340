"""Golden tests: Gemini captures in tests/data/gemini (cases.json names the OpenAI request, the
Gemini model and the upstream capture) -> the exact OpenAI bytes in tests/data/gemini/expected.

Every stream is also fed split at every byte offset, and cut into random pieces by hypothesis,
through SSEDecoder: the output never changes. Random parts of the output (ids, timestamps) are
normalised before comparing. To rewrite the expected files after an intended change, run
`RAWGATE_REGEN_GOLDEN=1 pytest tests/unit/test_transcode_golden.py` and review the diff.

The helpers here (`case_call`, `run_stream`, `run_whole`, `normalise`) are shared by the other
test_transcode_*.py files and test_vectors.py.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from rawgate.errors import RawgateError
from rawgate.translate import mapping, schemas
from rawgate.translate.call import GeminiCall
from rawgate.translate.gemini import decode_reply
from rawgate.translate.sse import SSEDecoder
from rawgate.translate.transcode_chat import ChatStream, chat_response, completion_response
from rawgate.translate.transcode_responses import ResponsesStream, responses_response

DATA = Path(__file__).resolve().parents[1] / "data" / "gemini"
EXPECTED = DATA / "expected"
CASES: list[dict[str, Any]] = orjson.loads((DATA / "cases.json").read_bytes())
REGEN = os.environ.get("RAWGATE_REGEN_GOLDEN") == "1"
RESPONSE_ID = "resp_golden"


# ---- shared helpers -----------------------------------------------------------------------------


def make_call(api: str, request: dict[str, Any], model: str) -> GeminiCall:
    body = orjson.dumps(request)
    if api == "chat":
        return mapping.chat_to_gemini(schemas.decode_chat(body), model)
    if api == "completions":
        return mapping.completion_to_gemini(schemas.decode_completion(body), model)
    return mapping.responses_to_gemini(schemas.decode_responses(body), model)


def case_call(case: dict[str, Any]) -> GeminiCall:
    return make_call(case["api"], case["request"], case["model"])


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class Transcoder:
    """One stream transcoder behind one interface, driven the way the gateway drives it."""

    def __init__(self, call: GeminiCall, **kw: Any) -> None:
        self.call = call
        if call.api == "responses":
            self.rs: ResponsesStream | None = ResponsesStream(call, RESPONSE_ID, **kw)
            self.cs: ChatStream | None = None
        else:
            self.rs = None
            self.cs = ChatStream(call, completions=call.api == "completions")

    def start(self) -> bytes:
        return self.rs.start() if self.rs is not None else b""

    def feed(self, payload: bytes) -> bytes:
        t = self.rs or self.cs
        assert t is not None
        return t.feed(decode_reply(payload))

    def finish(self) -> bytes:
        t = self.rs or self.cs
        assert t is not None
        return t.finish()

    def fail(self, err: RawgateError) -> bytes:
        t = self.rs or self.cs
        assert t is not None
        return t.fail(err)


def run_stream(call: GeminiCall, chunks: list[bytes], **kw: Any) -> bytes:
    """Upstream body pieces -> the downstream bytes, exactly as the gateway's pump does it."""
    t = Transcoder(call, **kw)
    out = [t.start()]
    dec = SSEDecoder()
    try:
        for chunk in chunks:
            out.extend(t.feed(p) for p in dec.feed(chunk))
        out.extend(t.feed(p) for p in dec.close())
        out.append(t.finish())
    except RawgateError as e:
        out.append(t.fail(e))
    return b"".join(out)


def run_whole(call: GeminiCall, body: bytes) -> bytes:
    """A non-stream upstream body -> `HTTP <status>\\n` + the JSON the client gets."""
    try:
        reply = decode_reply(body)
        if call.api == "chat":
            out = chat_response(call, reply)
        elif call.api == "completions":
            out = completion_response(call, reply)
        else:
            out = responses_response(call, reply, RESPONSE_ID)
    except RawgateError as e:
        return b"HTTP %d\n" % e.status + e.to_json()
    return b"HTTP 200\n" + out


_RANDOM = [
    (re.compile(rb'"(created|created_at)":\d+'), rb'"\1":0'),
    (re.compile(rb"call_[A-Za-z0-9]{12}\.(ts|tx)\."), rb"call_R.\1."),
    (re.compile(rb"call_[A-Za-z0-9]{24}"), b"call_R"),
    (re.compile(rb"\b(rs|msg|fc|ctc)_[0-9a-f]{24}"), rb"\1_R"),
    (re.compile(rb"\b(chatcmpl|cmpl)-[0-9a-f]{32}"), rb"\1-R"),
]
_BLOB = re.compile(rb'"rg1\.([A-Za-z0-9_\-]+)"')


def _open_blob(m: re.Match[bytes]) -> bytes:
    raw = m.group(1)
    doc = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    for pat, rep in _RANDOM:
        doc = pat.sub(rep, doc)
    return b'"rg1:' + doc.replace(b'"', b"'") + b'"'


def normalise(out: bytes) -> bytes:
    """Replace the random parts (ids, timestamps, ids inside encrypted_content)."""
    out = _BLOB.sub(_open_blob, out)
    for pat, rep in _RANDOM:
        out = pat.sub(rep, out)
    return out


def upstream(case: dict[str, Any]) -> bytes:
    return (DATA / case["upstream"]).read_bytes()


def is_stream(case: dict[str, Any]) -> bool:
    return str(case["upstream"]).endswith(".sse")


def render(case: dict[str, Any], cuts: list[int] | None = None) -> bytes:
    call = case_call(case)
    data = upstream(case)
    if is_stream(case):
        return normalise(run_stream(call, pieces(data, cuts or [])))
    return normalise(run_whole(call, data))


def sdk(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> openai.OpenAI:
    """An official openai client whose every request gets `body` back, without sockets."""
    ctype = "text/event-stream" if body.startswith((b"data:", b"event:")) else "application/json"
    head = {"content-type": ctype, **(headers or {})}

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers=head, content=body)

    transport = httpx2.MockTransport(handler)
    return openai.OpenAI(
        base_url="http://rawgate.test/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )


def async_sdk(body: bytes, status: int = 200) -> openai.AsyncOpenAI:
    ctype = "text/event-stream" if body.startswith((b"data:", b"event:")) else "application/json"

    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": ctype}, content=body)

    return openai.AsyncOpenAI(
        base_url="http://rawgate.test/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


def case(name: str) -> dict[str, Any]:
    return next(c for c in CASES if c["name"] == name)


# ---- golden files -------------------------------------------------------------------------------

_IDS = [c["name"] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_golden(case: dict[str, Any]) -> None:
    got = render(case)
    path = EXPECTED / (case["name"] + ".txt")
    if REGEN:
        path.write_bytes(got)
    assert got == path.read_bytes()


_STREAMS = [c for c in CASES if is_stream(c)]


@pytest.mark.parametrize("case", _STREAMS, ids=[c["name"] for c in _STREAMS])
def test_split_at_every_offset(case: dict[str, Any]) -> None:
    whole = render(case)
    data = upstream(case)
    for k in range(1, len(data)):
        assert render(case, [k]) == whole, f"split at {k}"


@pytest.mark.parametrize("case", _STREAMS, ids=[c["name"] for c in _STREAMS])
def test_one_byte_at_a_time(case: dict[str, Any]) -> None:
    data = upstream(case)
    assert render(case, list(range(1, len(data)))) == render(case)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_STREAMS), st.lists(st.integers(1, 4000), max_size=12))
def test_random_splits(case: dict[str, Any], cuts: list[int]) -> None:
    n = len(upstream(case))
    assert render(case, [c % n for c in cuts if c % n]) == render(case)


def test_lf_and_cr_framing_give_the_same_output() -> None:
    """Gemini sends CRLF; proxies re-frame with LF or (rarely) CR. Same events either way."""
    for case in _STREAMS:
        call = case_call(case)
        data = upstream(case)
        base = normalise(run_stream(call, [data]))
        lf = data.replace(b"\r\n", b"\n")
        cr = lf.replace(b"\n", b"\r")
        assert normalise(run_stream(case_call(case), [lf])) == base, case["name"]
        assert normalise(run_stream(case_call(case), [cr])) == base, case["name"]
        del call
