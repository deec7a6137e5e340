"""Codex CLI (the real `codex exec`, Responses API over SSE) against `rawgate serve --emulate`.

`.ci/run` installs @openai/codex under .ci/.npm; elsewhere set RAWGATE_CODEX or put `codex` on
PATH. Codex needs every output_item.done and a response.completed, sends the whole history with
store:false, namespace/custom/web_search tools and client_metadata, and runs the tool call it
gets, then sends its function_call_output back: all of that has to work through rawgate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers_gateway import serve_process

_LOCAL = Path(__file__).resolve().parents[2] / ".ci" / ".npm" / "node_modules" / ".bin" / "codex"


def _codex() -> str | None:
    for c in (os.environ.get("RAWGATE_CODEX"), str(_LOCAL), shutil.which("codex")):
        if c and os.access(c, os.X_OK):
            return c
    return None


CODEX = _codex()
pytestmark = pytest.mark.skipif(
    CODEX is None,
    reason="Codex CLI not installed (.ci/run: npm install --prefix .ci/.npm @openai/codex)",
)


def _exec(codex: str, origin: str, home: Path, work: Path, prompt: str) -> list[dict[str, object]]:
    cmd = [
        codex, "exec", "--skip-git-repo-check", "--ephemeral", "--disable", "plugins", "--json",
        "-c", "model_provider=rawgate", "-c", "model=gemini-2.5-flash",
        "-c", "model_providers.rawgate.name=rawgate",
        "-c", f'model_providers.rawgate.base_url="{origin}/v1"',
        "-c", "model_providers.rawgate.wire_api=responses",
        "-c", "model_providers.rawgate.env_key=RAWGATE_TEST_KEY",
        "-c", "model_providers.rawgate.stream_max_retries=0",
        prompt,
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
           "RAWGATE_TEST_KEY": "sk-test"}  # fmt: skip
    out = subprocess.run(
        cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _items(events: list[dict[str, object]], kind: str) -> list[dict[str, object]]:
    out = []
    for e in events:
        item = e.get("item")
        if e.get("type") == "item.completed" and isinstance(item, dict) and item["type"] == kind:
            out.append(item)
    return out


def test_codex_exec_answers_and_runs_a_tool_through_rawgate(tmp_path: Path) -> None:
    assert CODEX is not None
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".codex").mkdir(parents=True)
    work.mkdir()
    with serve_process(tmp_path / "rawgate") as origin:
        events = _exec(CODEX, origin, home, work, "say hi")
        msgs = _items(events, "agent_message")
        assert msgs and "say hi" in str(msgs[-1]["text"])
        assert any(e.get("type") == "turn.completed" for e in events)
        tool = '[[emu:tool_call name=exec_command args={"cmd":"echo rawgate-codex-ok"}]]'
        events = _exec(CODEX, origin, home, work, "run it " + tool)
        runs = _items(events, "command_execution")
        assert runs and "rawgate-codex-ok" in str(runs[0]["aggregated_output"])
        # The second request carried the function_call_output back: the emulator saw it.
        assert "functionResponse(exec_command)" in str(_items(events, "agent_message")[-1]["text"])
