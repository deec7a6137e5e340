"""Gemini CLI (the real `gemini -p`, google-genai inside, Gemini-native SSE) against
`rawgate serve --emulate`.

`.ci/run` installs @google/gemini-cli under .ci/.npm; elsewhere set RAWGATE_GEMINI_CLI or put
`gemini` on PATH. The CLI sends `x-goog-api-key`, a body with `parametersJsonSchema` tools and
snake/camel thinking config, needs a finishReason at the end of each stream, and in a tool loop
replays the model turn with its own `functionCall.id` and the thought signature: all of that
has to travel through rawgate unchanged. `-m` skips its router/classifier call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers_gateway import serve_process

_LOCAL = (
    Path(__file__).resolve().parents[2] / ".ci" / ".npm" / "node_modules" / ".bin" / "gemini"
)


def _gemini() -> str | None:
    for c in (os.environ.get("RAWGATE_GEMINI_CLI"), str(_LOCAL), shutil.which("gemini")):
        if c and os.access(c, os.X_OK):
            return c
    return None


GEMINI = _gemini()
pytestmark = pytest.mark.skipif(
    GEMINI is None,
    reason="Gemini CLI not installed (.ci/run: npm install --prefix .ci/.npm @google/gemini-cli)",
)
# One CLI run: start-up of the node bundle is ~5-10 s on this machine; a stuck run must not
# hold the suite.
RUN_TIMEOUT_S = 120


def _run(origin: str, home: Path, work: Path, prompt: str, *extra: str) -> str:
    assert GEMINI is not None
    env = {
        **os.environ,
        "HOME": str(home),
        "GEMINI_CLI_TRUST_WORKSPACE": "true",
        "GOOGLE_GEMINI_BASE_URL": origin,
        "GEMINI_API_KEY": "gk-test-client-key",
        "NO_COLOR": "1",
    }
    out = subprocess.run(
        [GEMINI, "-p", prompt, "-m", "gemini-2.5-flash", *extra],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


def test_gemini_cli_answers_and_runs_a_shell_tool_through_rawgate(tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".gemini").mkdir(parents=True)
    work.mkdir()
    settings = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
    (home / ".gemini" / "settings.json").write_text(json.dumps(settings))
    with serve_process(tmp_path / "rawgate") as origin:
        # (a) a plain prompt: the emulator echoes it back.
        text = _run(origin, home, work, "say hi to rawgate")
        assert "say hi to rawgate" in text
        # (b) the tool loop: the CLI runs the shell command and sends its functionResponse back;
        # the emulator's answer to that second turn names it.
        args = '{"command":"echo hello-from-gemini-tool"}'
        tool = f"[[emu:tool_call name=run_shell_command args={args}]]"
        text = _run(origin, home, work, "run it " + tool, "--yolo")
        assert "received functionResponse(run_shell_command)" in text
