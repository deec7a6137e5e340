"""Claude Code (the real `claude -p` CLI, Anthropic Messages over SSE) against a real
`rawgate serve` process whose upstream is the emulator, run in-process so the test can read what
reached "Google".

`.ci/run` installs @anthropic-ai/claude-code (a native binary) under .ci/.npm; elsewhere set
RAWGATE_CLAUDE or put `claude` on PATH. Claude Code sends `?beta=true`, x-api-key, a dozen
betas, adaptive thinking, 12 tools with JSON Schema 2020-12, a role:"system" message and a
billing block, and with --allowedTools runs the tool it is asked to, then sends the tool_result
back: all of that has to work through rawgate with no model config (claude-opus-* maps to
routing.pro_model).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from rawgate.accounts.store import AccountStore
from rawgate.emulator.server import serve as serve_emulator
from tests.helpers_gateway import serve_process

pytestmark = pytest.mark.anyio

_ROOT = Path(__file__).resolve().parents[2]
_LOCAL = _ROOT / ".ci" / ".npm" / "node_modules" / ".bin" / "claude"
# Claude Code's first start can take seconds (it unpacks and scans); a turn against the
# emulator takes about one.
RUN_TIMEOUT_S = 120


def _claude() -> str | None:
    for c in (os.environ.get("RAWGATE_CLAUDE"), str(_LOCAL), shutil.which("claude")):
        if c and os.access(c, os.X_OK):
            return c
    return None


CLAUDE = _claude()
skip_no_cli = pytest.mark.skipif(
    CLAUDE is None,
    reason="Claude Code CLI not installed (.ci/run: npm install --prefix .ci/.npm "
    "@anthropic-ai/claude-code)",
)


async def _run(origin: str, tmp: Path, *args: str) -> tuple[int, str, str]:
    assert CLAUDE is not None
    home, work = tmp / "home", tmp / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": origin,
        "ANTHROPIC_API_KEY": "sk-test",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }
    with anyio.fail_after(RUN_TIMEOUT_S + 10):
        r = await anyio.run_process(
            ["timeout", str(RUN_TIMEOUT_S), CLAUDE, "-p", *args],
            cwd=work,
            env=env,
            stdin=None,
            check=False,
        )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def _generate_calls(emu: Any) -> list[dict[str, Any]]:
    out = []
    for _method, path, _query, _headers, body in emu.core.recent:
        if "GenerateContent" in path or "generateContent" in path:
            out.append(orjson.loads(body))
    return out


@skip_no_cli
async def test_claude_code_answers_and_runs_a_tool_through_rawgate(tmp_path: Path) -> None:
    async with serve_emulator(host="127.0.0.1", port=0, ssl_context=None) as emu:
        home = tmp_path / "rawgate"
        AccountStore(home / "accounts.json").add_api_key(emu.api_key, label="emu")
        env = {"RAWGATE_UPSTREAM_GEMINI_BASE_URL": emu.base_url}
        with serve_process(home, emulate=False, env=env) as origin:
            # (a) a plain prompt: the emulator echoes the last user turn, which holds it.
            rc, out, err = await _run(origin, tmp_path, "say hi to the gateway")
            assert rc == 0, (out[-2000:], err[-2000:])
            assert "say hi to the gateway" in out
            calls = _generate_calls(emu)
            assert len(calls) == 1, "one request for one -p prompt (protocols-2.md B1)"
            sent = calls[0]
            assert "billing" not in orjson.dumps(sent).decode()
            names = {d["name"] for t in sent["tools"] for d in t["functionDeclarations"]}
            assert "Bash" in names

            # (b) a tool loop: Claude Code runs Bash, the second turn carries its output.
            tool = (
                '[[emu:tool_call name=Bash args={"command":"echo hello-from-tool",'
                '"description":"Echo a marker"}]]'
            )
            rc, out, err = await _run(
                origin, tmp_path, "run it " + tool, "--allowedTools", "Bash", "--max-turns", "3"
            )
            assert rc == 0, (out[-2000:], err[-2000:])
            assert "received functionResponse(Bash)" in out
            calls = _generate_calls(emu)[1:]
            assert len(calls) == 2
            last_turn = calls[1]["contents"][-1]
            parts = last_turn["parts"]
            responses = [p["functionResponse"] for p in parts if "functionResponse" in p]
            assert [r["name"] for r in responses] == ["Bash"]
            assert "hello-from-tool" in orjson.dumps(responses[0]["response"]).decode()


@skip_no_cli
async def test_claude_code_small_model_and_overloaded_upstream(tmp_path: Path) -> None:
    """`--model haiku` reaches routing.lite_model with no config; an upstream 503 reaches
    Claude Code as Anthropic's 529 overloaded_error, which it names (protocols-2.md B4)."""
    async with serve_emulator(host="127.0.0.1", port=0, ssl_context=None) as emu:
        home = tmp_path / "rawgate"
        AccountStore(home / "accounts.json").add_api_key(emu.api_key, label="emu")
        env = {"RAWGATE_UPSTREAM_GEMINI_BASE_URL": emu.base_url}
        with serve_process(home, emulate=False, env=env) as origin:
            rc, out, err = await _run(origin, tmp_path, "small one", "--model", "haiku")
            assert rc == 0, (out[-2000:], err[-2000:])
            assert "small one" in out
            paths = [path for _m, path, *_rest in emu.core.recent]
            assert paths[-1].startswith("/v1beta/models/gemini-2.5-flash-lite:")

            # Gemini 3 by name: the call's thought signature rides in the tool_use id through
            # Claude Code's history and reaches Gemini again (not the skip value).
            tool = (
                '[[emu:tool_call name=Bash args={"command":"echo sig-ok",'
                '"description":"Echo"}]]'
            )
            rc, out, err = await _run(
                origin, tmp_path, "go " + tool, "--model", "gemini-3-pro-preview",
                "--allowedTools", "Bash", "--max-turns", "3",
            )  # fmt: skip
            assert rc == 0, (out[-2000:], err[-2000:])
            assert "received functionResponse(Bash)" in out
            turn2 = _generate_calls(emu)[-1]
            model_turn = turn2["contents"][-2]
            call = next(p for p in model_turn["parts"] if "functionCall" in p)
            assert call["thoughtSignature"] not in ("", "skip_thought_signature_validator")

            rc, out, err = await _run(origin, tmp_path, "[[emu:error status=503]] busy?")
            assert rc != 0
            assert "API Error: 529" in out + err and "overloaded" in out + err
