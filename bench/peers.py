"""bench.peers: the gateways a user would pick instead, installed on demand, run on loopback.

Invariants:
- Each peer lives under bench/.peers/ (gitignored): LiteLLM in its own virtualenv, Portkey in
  its own npm prefix. Nothing is installed into the project's environment.
- Each peer is pointed at the same upstream as rawgate, as a *Gemini* upstream, so it does the
  same OpenAI -> Gemini translation rawgate does (no OpenAI passthrough, which would be cheaper).
- Peers listen on 127.0.0.1 only. Portkey's server binds every interface by itself; a preload
  script (loopback.cjs) makes its listen() bind 127.0.0.1.
- A peer that cannot be installed or started raises PeerUnavailable with the reason; the run
  reports it and goes on.

How each one reaches a Gemini upstream at a custom base URL (checked in their installed source):
- LiteLLM 1.108: `model: gemini/<m>` with `api_base: http://127.0.0.1:P/v1beta`;
  `VertexBase._check_custom_proxy` builds `{api_base}/models/{m}:{endpoint}`, adds `alt=sse`
  for streams, and sends the key as `x-goog-api-key`. Since 1.10x the proxy refuses to start
  without a master key unless LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true.
  Its Gemini pass-through (`/gemini/{endpoint:path}`, proxy/pass_through_endpoints/
  llm_passthrough_endpoints.py `gemini_proxy_route`) forwards to `os.getenv("GEMINI_API_BASE")
  or "https://generativelanguage.googleapis.com"` + the endpoint, with `?key=` set to the
  GEMINI_API_KEY credential (it reads the client's own key from `?key=`/`x-goog-api-key` for
  its auth only); a path containing "stream" is relayed as a stream.
- Portkey 1.15: per request, `x-portkey-provider: google`,
  `x-portkey-custom-host: http://127.0.0.1:P` (the base URL *without* /v1beta: the google
  provider's endpoint adds `/v1beta/models/{m}:generateContent?key=K`) and
  `Authorization: Bearer K`. Chat streams call `:streamGenerateContent?key=K` without alt=sse
  (the JSON-array stream), split on CRLF. Known deviations (verified against the stand-in):
  its OpenAI chat stream from Gemini ends without `data: [DONE]`, and /v1/responses answers
  "createModelResponse is not supported by google".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.procs import Proc
from bench.scenarios import (
    EMBEDDING_MODEL,
    MODEL,
    OPENAI_EMBEDDING_MODEL,
    TargetInfo,
    Upstream,
)

ROOT = Path(__file__).resolve().parent
PEERS_DIR = ROOT / ".peers"
# Versions verified with this harness; override with BENCH_LITELLM_SPEC / BENCH_PORTKEY_SPEC.
LITELLM_SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]==1.108.7")
PORTKEY_SPEC = os.environ.get("BENCH_PORTKEY_SPEC", "@portkey-ai/gateway@1.15.2")
# Installing LiteLLM pulls ~250 packages (~750 MB); give it time on a slow mirror.
INSTALL_TIMEOUT_S = 1200
# LiteLLM imports a lot at start-up (10 s here); Portkey starts in ~1 s after a 1 s spinner.
LITELLM_START_S = 120.0
PORTKEY_START_S = 30.0
KNOWN = ("litellm", "portkey")


class PeerUnavailable(RuntimeError):
    pass


def _run(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "ab") as f:
        try:
            r = subprocess.run(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                               timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerUnavailable(f"{argv[0]} failed: {e}") from e
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise PeerUnavailable(f"`{' '.join(argv[:4])} ...` exited {r.returncode}: "
                              + " | ".join(tail))


# --- LiteLLM -------------------------------------------------------------------------------------


def litellm_install(log: Path) -> Path:
    """The venv's `litellm` executable, creating the venv on first use."""
    venv = PEERS_DIR / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing {LITELLM_SPEC} into {venv} (a few minutes; log {log})",
          file=sys.stderr)
    base = shutil.which("python3") or sys.executable
    _run([base, "-m", "venv", str(venv)], log)
    _run([str(venv / "bin" / "pip"), "install", "-q", LITELLM_SPEC], log)
    if not exe.exists():
        raise PeerUnavailable(f"{exe} missing after install")
    return exe


def litellm_version() -> str:
    py = PEERS_DIR / "litellm-venv" / "bin" / "python"
    try:
        code = "import importlib.metadata as m; print(m.version('litellm'))"
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def litellm_config(up: Upstream) -> str:
    """LiteLLM proxy config: one Gemini model at the upstream, nothing else in the path."""
    return (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: gemini/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{up.port}/v1beta\n"
        f"      api_key: {up.api_key}\n"
        f"  - model_name: {OPENAI_EMBEDDING_MODEL}\n"
        "    litellm_params:\n"
        f"      model: gemini/{EMBEDDING_MODEL}\n"
        f"      api_base: http://127.0.0.1:{up.port}/v1beta\n"
        f"      api_key: {up.api_key}\n"
        "litellm_settings:\n"
        "  callbacks: []\n"
        "  num_retries: 0\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
    )


def litellm_env(up: Upstream) -> dict[str, str]:
    """LiteLLM's environment: ours less its own settings, plus the run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
    env |= {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no cost-map fetch at start-up
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",  # master key off
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCKER": "True",
        # The same upstream connection allowance rawgate gets against the HTTP/1.1 emulator
        # (LiteLLM's default is 500 per host).
        "AIOHTTP_CONNECTOR_LIMIT": "4096",
        "AIOHTTP_CONNECTOR_LIMIT_PER_HOST": "2048",
        # The Gemini pass-through's upstream and key (read per request, not from the config).
        "GEMINI_API_BASE": f"http://127.0.0.1:{up.port}",
        "GEMINI_API_KEY": up.api_key,
    }
    return env


def litellm_info(up: Upstream, port: int) -> TargetInfo:
    # Its /v1/messages (Anthropic) routes by model_name to the same gemini/ entry; its
    # /v1/embeddings by the OpenAI embedding name to gemini-embedding-001 (batchEmbedContents);
    # native generateContent goes through its Gemini pass-through (/gemini/v1beta/...), whose
    # client key (any, with the master key off) it reads from x-goog-api-key.
    apis = {"chat", "responses", "messages", "native"}
    if up.kind == "emulator":  # the stand-in has no embeddings
        apis.add("embeddings")
    return TargetInfo("litellm", "openai", port, apis=frozenset(apis), native_prefix="/gemini",
                      native_headers=(("x-goog-api-key", "sk-bench-client"),))


def litellm_proc(
    up: Upstream, port: int, cpu: int | None, log_dir: Path, workers: int = 1
) -> tuple[Proc, TargetInfo]:
    exe = litellm_install(log_dir / "litellm-install.log")
    cfg = log_dir / f"litellm-{port}.yaml"
    cfg.write_text(litellm_config(up))
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", str(workers)]
    proc = Proc("litellm", argv, port=port, ready_path="/health/liveliness",
                env=litellm_env(up), cwd=str(log_dir), cpu=cpu, log_dir=log_dir)
    return proc, litellm_info(up, port)


# --- Portkey -------------------------------------------------------------------------------------

LOOPBACK_CJS = """\
// Preloaded with `node --require`: Portkey's start-server calls listen(port) with no host,
// which binds every interface. Make such calls bind 127.0.0.1 instead.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\\d+$/.test(args[0]))) {
    if (typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  } else if (args[0] && typeof args[0] === 'object' && args[0].port !== undefined
             && !args[0].host) {
    args[0] = Object.assign({}, args[0], { host: '127.0.0.1' });
  }
  return listen.apply(this, args);
};
"""


def portkey_install(log: Path) -> Path:
    prefix = PEERS_DIR / "portkey"
    script = prefix / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if script.exists():
        return script
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise PeerUnavailable("node/npm not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing {PORTKEY_SPEC} under {prefix} (log {log})", file=sys.stderr)
    if not (prefix / "package.json").exists():
        (prefix / "package.json").write_text('{"name": "bench-portkey", "private": true}\n')
    _run(["npm", "install", "--no-audit", "--no-fund", PORTKEY_SPEC], log, cwd=prefix)
    if not script.exists():
        raise PeerUnavailable(f"{script} missing after npm install")
    return script


def portkey_version() -> str:
    import json

    pkg = PEERS_DIR / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
    try:
        return str(json.loads(pkg.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


def portkey_proc(
    up: Upstream, port: int, cpu: int | None, log_dir: Path
) -> tuple[Proc, TargetInfo]:
    script = portkey_install(log_dir / "portkey-install.log")
    preload = PEERS_DIR / "loopback.cjs"
    preload.write_text(LOOPBACK_CJS)
    argv = ["node", "--require", str(preload), str(script), f"--port={port}", "--headless"]
    env = dict(os.environ) | {"NODE_ENV": "production"}
    proc = Proc("portkey", argv, port=port, ready_path="/", env=env, cwd=str(script.parent),
                cpu=cpu, log_dir=log_dir)
    info = TargetInfo(
        "portkey",
        "openai",
        port,
        headers=(
            ("x-portkey-provider", "google"),
            ("x-portkey-custom-host", f"http://127.0.0.1:{up.port}"),
            ("authorization", f"Bearer {up.api_key}"),
        ),
        apis=frozenset({"chat"}),
        relaxed={"tail": "Portkey ends OpenAI chat streams from Gemini without `data: [DONE]`; "
                         "its streams are checked for the last chunk's finish_reason instead"},
        stream_contains=('"finish_reason":"stop"',),
    )
    return proc, info


def start_peer(
    name: str, up: Upstream, port: int, cpu: int | None, log_dir: Path
) -> tuple[Proc, TargetInfo]:
    """Install if needed, start, wait until ready. PeerUnavailable when any step fails."""
    from bench.procs import ProcError

    if name == "litellm":
        proc, info = litellm_proc(up, port, cpu, log_dir)
        timeout = LITELLM_START_S
    elif name == "portkey":
        proc, info = portkey_proc(up, port, cpu, log_dir)
        timeout = PORTKEY_START_S
    else:
        raise PeerUnavailable(f"unknown peer {name!r} (known: {', '.join(KNOWN)})")
    try:
        proc.start().wait_ready(timeout)
    except ProcError as e:
        proc.stop()
        raise PeerUnavailable(str(e)) from e
    return proc, info


def version(name: str) -> str:
    return litellm_version() if name == "litellm" else portkey_version()
