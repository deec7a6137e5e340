"""Vector 14 with the real openai-node SDK: 150 inputs, `dimensions: 768`, no encoding_format.
The Node SDK asks for base64 and decodes it with Float32Array without checking the type, so a
float list would come out as empty vectors: rawgate must answer the base64 it was asked for.

`.ci/run` installs `openai` under .ci/.npm; without node or the package this test skips."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers_gateway import serve_process

_MODULES = Path(__file__).resolve().parents[2] / ".ci" / ".npm" / "node_modules"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None or not (_MODULES / "openai").is_dir(),
    reason="node or the openai npm package not installed (.ci/run: npm install --prefix .ci/.npm"
    " openai)",
)

SCRIPT = """
const OpenAI = require(process.argv[2]);
const client = new OpenAI({ baseURL: process.argv[3], apiKey: "sk-test", maxRetries: 0 });
const input = Array.from({ length: 150 }, (_, i) => `node input ${i}`);
client.embeddings.create({ model: "text-embedding-3-small", input, dimensions: 768 })
  .then((r) => {
    const out = r.data.map((d) => ({ index: d.index, n: d.embedding.length,
      norm: Math.sqrt(d.embedding.reduce((s, x) => s + x * x, 0)) }));
    console.log(JSON.stringify(out));
  })
  .catch((e) => { console.error(String(e)); process.exit(1); });
"""


def test_openai_node_decodes_150_base64_vectors_in_order(tmp_path: Path) -> None:
    assert NODE is not None
    script = tmp_path / "embed.cjs"
    script.write_text(SCRIPT)
    with serve_process(tmp_path / "rawgate") as origin:
        out = subprocess.run(
            [NODE, str(script), str(_MODULES / "openai"), origin + "/v1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert [r["index"] for r in rows] == list(range(150))
    assert all(r["n"] == 768 for r in rows)
    assert all(math.isclose(r["norm"], 1.0, abs_tol=1e-3) for r in rows)
