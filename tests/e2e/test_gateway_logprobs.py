"""Logprobs end to end with the openai SDK: chat `logprobs`/`top_logprobs` and legacy `logprobs`
become Gemini's responseLogprobs/logprobs, and the emulator's deterministic logprobsResult comes
back as OpenAI's `logprobs` (stream and not); out-of-range values are a 400 naming the param."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from rawgate.emulator.script import logprobs_result
from tests.helpers_gateway import gateway_stack

pytestmark = pytest.mark.anyio

MODEL = "gemini-2.5-flash"
PROMPT = "The quick brown fox jumps over the lazy dog"


def _expected(text: str, top: int) -> list[tuple[str, float, list[str]]]:
    """(token, logprob, top tokens) per token, as the emulator computes them for `text`."""
    res, _ = logprobs_result(text, top)
    tops = res.get("topCandidates", [])
    return [
        (
            c["token"],
            c["logProbability"],
            [a["token"] for a in tops[i]["candidates"]] if top else [],
        )
        for i, c in enumerate(res["chosenCandidates"])
    ]


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)


async def test_chat_non_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        r = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            logprobs=True,
            top_logprobs=3,
        )
        ch = r.choices[0]
        assert ch.message.content == PROMPT
        assert ch.logprobs is not None and ch.logprobs.content is not None
        got = ch.logprobs.content
        assert "".join(t.token for t in got) == PROMPT
        want = _expected(PROMPT, 3)
        assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in got] == want
        assert all(t.logprob < 0 for t in got)
        assert all(t.bytes == list(t.token.encode()) for t in got)
        assert all(t.top_logprobs[0].logprob == t.logprob for t in got)
        # What went upstream: Gemini's own fields.
        sent = run.emulator.core.recent[-1][4]
        assert b'"responseLogprobs":true' in sent and b'"logprobs":3' in sent
        # Without logprobs: null, as before, and nothing asked upstream.
        plain = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}]
        )
        assert plain.choices[0].logprobs is None
        assert b"Logprobs" not in run.emulator.core.recent[-1][4]


async def test_chat_logprobs_without_top_has_empty_alternatives(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "abcdefgh"}], logprobs=True
        )
        lp = r.choices[0].logprobs
        assert lp is not None and lp.content is not None
        assert [t.token for t in lp.content] == ["abcd", "efgh"]
        assert all(t.top_logprobs == [] for t in lp.content)


async def test_chat_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "[[emu:chunk_chars n=8]] " + PROMPT}],
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        text = ""
        tokens: list[tuple[str, float, list[str]]] = []
        with_lp = 0
        async for chunk in stream:
            for ch in chunk.choices:
                piece = ch.delta.content or ""
                text += piece
                if ch.logprobs is not None and ch.logprobs.content:
                    with_lp += 1
                    toks = ch.logprobs.content
                    # Each chunk's tokens are that chunk's text: never carried to another frame.
                    assert "".join(t.token for t in toks) == piece
                    tokens += [
                        (t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in toks
                    ]
        assert text == PROMPT
        assert with_lp == 6  # 43 characters in chunks of 8
        # 8-character chunks are two 4-character tokens each: the same tokens as the whole text.
        assert tokens == _expected(PROMPT, 2)


async def test_completions_non_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        r = await c.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, echo=True)
        ch = r.choices[0]
        assert ch.text == PROMPT + PROMPT
        lp = ch.logprobs
        assert lp is not None and lp.tokens is not None
        assert "".join(lp.tokens) == PROMPT
        want = _expected(PROMPT, 2)
        assert lp.token_logprobs == [w[1] for w in want]
        res, _ = logprobs_result(PROMPT, 2)
        assert lp.top_logprobs == [
            {a["token"]: a["logProbability"] for a in step["candidates"]}
            for step in res["topCandidates"]
        ]
        assert all(len(d) == 2 for d in lp.top_logprobs)
        # Offsets into the choice's text, after the echoed prompt.
        assert lp.text_offset == [len(PROMPT) + 4 * i for i in range(len(want))]
        sent = run.emulator.core.recent[-1][4]
        assert b'"responseLogprobs":true' in sent and b'"logprobs":2' in sent


async def test_completions_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        stream = await c.completions.create(
            model=MODEL, prompt="[[emu:chunk_chars n=12]] " + PROMPT, logprobs=0, stream=True
        )
        text = ""
        tokens: list[str] = []
        offsets: list[int] = []
        values: list[float] = []
        async for chunk in stream:
            ch = chunk.choices[0]
            if ch.logprobs is not None and ch.logprobs.tokens:
                assert "".join(ch.logprobs.tokens) == ch.text
                assert ch.logprobs.text_offset is not None and ch.logprobs.text_offset[0] == len(
                    text
                )
                tokens += ch.logprobs.tokens
                offsets += ch.logprobs.text_offset
                values += ch.logprobs.token_logprobs or []
            text += ch.text
        assert text == PROMPT
        assert "".join(tokens) == PROMPT
        assert offsets == [4 * i for i in range(len(tokens))]
        assert values == [w[1] for w in _expected(PROMPT, 0)]
        sent = run.emulator.core.recent[-1][4]
        assert b'"responseLogprobs":true' in sent and b'"logprobs"' not in sent.replace(
            b'"responseLogprobs"', b""
        )


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/completions", {"logprobs": 21}, "logprobs"),
        ("/responses", {"top_logprobs": 21}, "top_logprobs"),
    ],
)
async def test_out_of_range_or_unsupported_logprobs_is_400(
    tmp_path: Path, path: str, body: dict[str, object], param: str
) -> None:
    async with gateway_stack(tmp_path) as run, httpx.AsyncClient(base_url=run.base_url) as h:
        base: dict[str, object] = {"model": MODEL}
        if path == "/chat/completions":
            base["messages"] = [{"role": "user", "content": "x"}]
        elif path == "/completions":
            base["prompt"] = "x"
        else:
            base["input"] = "x"
        r = await h.post(path, json={**base, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert run.emulator.stats.get("generate", 0) == 0  # never reached Google


async def test_responses_non_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        r = await c.responses.create(
            model=MODEL,
            input=PROMPT,
            top_logprobs=2,
            include=["message.output_text.logprobs"],
        )
        assert r.output_text == PROMPT
        (msg,) = [o for o in r.output if o.type == "message"]
        part = msg.content[0]
        assert part.type == "output_text" and part.logprobs is not None
        got = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in part.logprobs]
        assert got == _expected(PROMPT, 2)
        assert all(t.bytes == list(t.token.encode()) for t in part.logprobs)
        sent = run.emulator.core.recent[-1][4]
        assert b'"responseLogprobs":true' in sent and b'"logprobs":2' in sent
        # Not asked: empty lists as before, nothing asked upstream.
        plain = await c.responses.create(model=MODEL, input=PROMPT)
        (msg,) = [o for o in plain.output if o.type == "message"]
        assert msg.content[0].type == "output_text" and msg.content[0].logprobs == []
        assert b"Logprobs" not in run.emulator.core.recent[-1][4]


async def test_responses_stream_logprobs(tmp_path: Path) -> None:
    async with gateway_stack(tmp_path) as run, _client(run.base_url) as c:
        stream = await c.responses.create(
            model=MODEL,
            input="[[emu:chunk_chars n=8]] " + PROMPT,
            include=["message.output_text.logprobs"],
            stream=True,
        )
        deltas: list[tuple[str, float]] = []
        done_tokens: list[str] = []
        final = None
        async for ev in stream:
            if ev.type == "response.output_text.delta":
                assert "".join(t.token for t in ev.logprobs) == ev.delta
                deltas += [(t.token, t.logprob) for t in ev.logprobs]
            elif ev.type == "response.output_text.done":
                done_tokens = [t.token for t in ev.logprobs]
            elif ev.type == "response.completed":
                final = ev.response
        want = _expected(PROMPT, 0)
        assert deltas == [(w[0], w[1]) for w in want]
        assert done_tokens == [w[0] for w in want]
        assert final is not None and final.output_text == PROMPT
        (msg,) = [o for o in final.output if o.type == "message"]
        assert msg.content[0].type == "output_text"
        assert [t.token for t in msg.content[0].logprobs or []] == done_tokens
