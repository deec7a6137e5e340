"""The seed tutorial's checkpoints, with its own commands, against `rawgate serve --emulate`.

A real `rawgate serve --emulate` process on a free port (zero set-up: no account, no network),
driven by the openai SDK exactly as the tutorial writes it, and by curl when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.helpers_gateway import serve_process


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_process(tmp_path_factory.mktemp("home")) as origin:
        yield origin


def test_step1_health_and_models(gateway: str) -> None:
    assert httpx.get(gateway + "/healthz").json()["status"] == "ok"
    models = httpx.get(gateway + "/v1/models").json()
    assert models["object"] == "list" and isinstance(models["data"], list) and models["data"]


def test_step2_python_sdk_chat(gateway: str) -> None:
    client = openai.OpenAI(api_key="sk-antigravity", base_url=gateway + "/v1", max_retries=0)
    response = client.chat.completions.create(
        model="gemini-3-flash",
        messages=[{"role": "user", "content": "Olá, por favor se apresente"}],
    )
    assert response.choices[0].message.content
    client.close()


def test_step3_stream_ends_with_done(gateway: str) -> None:
    body = {
        "model": "gemini-3-flash",
        "stream": True,
        "messages": [{"role": "user", "content": "Explique em 3 frases o que é gateway"}],
    }
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines)
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def test_step4_responses_with_instructions(gateway: str) -> None:
    r = httpx.post(
        gateway + "/v1/responses",
        json={
            "model": "gemini-3-flash",
            "instructions": "Você é um revisor de código rigoroso.",
            "input": "Aponte o bug mais provável deste código:\n\n"
            "function add(a, b) { return a - b }",
        },
    )
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "response" and doc["status"] == "completed"
    assert doc["output"][-1]["content"][0]["text"]


def test_step5_x_mapped_model_for_gpt_4o(gateway: str) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "olá"}]})
    curl = shutil.which("curl")
    if curl is None:  # the same check over httpx on machines without curl
        r = httpx.post(gateway + "/v1/chat/completions", content=body)
        head = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    else:
        out = subprocess.run(
            [curl, "-si", gateway + "/v1/chat/completions", "-H",
             "Content-Type: application/json", "-d", body],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        head = out.stdout.split("\r\n\r\n", 1)[0]
    assert re.search(r"(?im)^x-mapped-model: gemini-2\.5-flash\r?$", head)
    assert re.search(r"(?im)^x-account-email: ", head)


def test_wrong_base_url_gets_a_hint(gateway: str, tmp_path: Path) -> None:
    r = httpx.post(gateway + "/v1/chat/completions/responses", json={})
    assert r.status_code == 404
    assert "base_url" in r.json()["error"]["message"]
