"""The servers ``bench/peers.py`` measures: an instant stub upstream, ``backburner serve`` and
the peer gateways, each installed once into a cache directory and started as a subprocess.

Run as ``python bench/peer_servers.py --stub-port N`` it is the stub: an ``aiohttp.web`` server
answering ``POST /v1/chat/completions`` at once (one JSON completion, or with ``"stream": true``
four chunks as server-sent events and ``data: [DONE]``) and ``GET /v1/models``.

Every process is started in its own session and added to the caller's ``spawned`` list before
anything waits for it, so the caller can stop each one by its PID whatever happens
(``tests.support.procs.stop``: SIGTERM to its session, SIGKILL if need be).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import procs  # noqa: E402

MODEL = procs.UPSTREAM_MODEL
ROUTE = "/v1/chat/completions"
DEFAULT_CACHE = Path.home() / ".cache" / "backburner-bench"
BACKBURNER = "backburner"
DIRECT = "direct (stub)"
PORTKEY = "Portkey"
LITELLM = "LiteLLM"
INSTALL_TIMEOUT = 1200.0
LITELLM_SPEC = "litellm[proxy]==1.108.7"
PORTKEY_VERSION = "1.15.2"
HONO_NODE_SERVER = "1.13.8"


# ---------------------------------------------------------------- the stub upstream


def _completion(model: str, text: str) -> bytes:
    answer = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {text}"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return json.dumps(answer, separators=(",", ":")).encode()


def _events(model: str, text: str) -> Iterator[bytes]:
    created = int(time.time())
    deltas: list[tuple[dict[str, str], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "echo: "}, None),
        ({"content": text}, None),
        ({}, "stop"),
    ]
    for delta, finish in deltas:
        chunk = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _stub_chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    model = str(body.get("model", MODEL))
    messages = body.get("messages") or [{}]
    text = str(messages[-1].get("content", ""))
    if body.get("stream") is not True:
        return web.Response(body=_completion(model, text), content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in _events(model, text):
        await resp.write(event)
    await resp.write_eof()
    return resp


async def _stub_models(request: web.Request) -> web.Response:
    model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}
    return web.json_response({"object": "list", "data": [model]})


def run_stub(port: int) -> None:
    app = web.Application()
    app.router.add_post(ROUTE, _stub_chat)
    app.router.add_get("/v1/models", _stub_models)
    web.run_app(app, host=procs.LOOPBACK, port=port, print=None, access_log=None)


# ---------------------------------------------------------------- processes


@dataclass
class Target:
    """One path under test: where to send, with which headers, and whose CPU to count."""

    name: str
    proc: procs.Proc
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    version: str = ""


def spawn(
    name: str,
    argv: list[str],
    work: Path,
    port: int,
    spawned: list[procs.Proc],
    env: Mapping[str, str] | None = None,
) -> procs.Proc:
    """Start ``argv`` in its own session (so that stopping it reaches its children too) and add
    it to ``spawned`` at once, before anything waits for it."""
    log_path = work / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=work,
            start_new_session=True,
        )
    proc = procs.Proc(popen, f"http://{procs.LOOPBACK}:{port}", log_path, argv)
    spawned.append(proc)
    return proc


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live descendant, plus what they counted
    for the children they have already reaped (Linux /proc)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- peers


def _run_logged(argv: list[str], log: Path, timeout: float, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            cwd=cwd,
            check=True,
        )


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


def install_litellm(cache: Path) -> tuple[Path, str]:
    """``litellm[proxy]`` in its own venv under ``cache`` (once); (its bin dir, its version)."""
    home = cache / "litellm"
    venv, done = home / "venv", home / "installed.ok"
    python = venv / "bin" / "python"
    home.mkdir(parents=True, exist_ok=True)
    if not done.exists() or done.read_text() != LITELLM_SPEC:
        done.unlink(missing_ok=True)
        log = home / "install.log"
        try:
            if not python.exists():
                _run_logged([sys.executable, "-m", "venv", str(venv)], log, 120)
            _run_logged([str(python), "-m", "pip", "install", LITELLM_SPEC], log, INSTALL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"pip install {LITELLM_SPEC} failed: {_tail(log)}") from exc
        done.write_text(LITELLM_SPEC)
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    version = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    return venv / "bin", version


def install_portkey(cache: Path) -> tuple[Path, str]:
    """``@portkey-ai/gateway`` from npm under ``cache`` (once); (its start script, its version).

    ``@hono/node-server`` is held at a version before 1.14 (npm ``overrides``): with the newer
    ones the gateway answers every streamed request with a 500 (``TypeError: immutable`` in its
    ``updateHeaders``; Portkey-AI/gateway issue 1389)."""
    home = cache / "portkey"
    package = home / "node_modules" / "@portkey-ai" / "gateway"
    script = package / "build" / "start-server.js"
    manifest = {
        "private": True,
        "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER},
    }
    wanted = json.dumps(manifest, indent=2) + "\n"
    home.mkdir(parents=True, exist_ok=True)
    if not shutil.which("node") or not shutil.which("npm"):
        raise RuntimeError("node and npm are not on PATH")
    done = home / "installed.ok"
    if not script.exists() or not done.exists() or done.read_text() != wanted:
        done.unlink(missing_ok=True)
        (home / "package.json").write_text(wanted)
        (home / "package-lock.json").unlink(missing_ok=True)
        log = home / "install.log"
        try:
            _run_logged(["npm", "install", "--no-audit", "--no-fund"], log, INSTALL_TIMEOUT, home)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"npm install @portkey-ai/gateway failed: {_tail(log)}") from exc
        done.write_text(wanted)
    version = str(json.loads((package / "package.json").read_text())["version"])
    return script, f"{version} (@hono/node-server {HONO_NODE_SERVER})"


def start_litellm(cache: Path, stub: str, work: Path, spawned: list[procs.Proc]) -> Target:
    bin_dir, version = install_litellm(cache)
    key = "sk-" + secrets.token_hex(24)
    config = {  # JSON is YAML
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{stub}/v1",
                    "api_key": "sk-stub-" + secrets.token_hex(8),
                },
            }
        ],
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    config_path = work / "litellm.yaml"
    config_path.write_text(json.dumps(config, indent=2))
    port = procs.free_port()
    argv = [str(bin_dir / "litellm"), "--config", str(config_path), "--host", procs.LOOPBACK]
    argv += ["--port", str(port), "--num_workers", "1"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key}
    proc = spawn("litellm", argv, work, port, spawned, env)
    procs.wait_http(proc, "/health/liveliness", timeout=180)
    headers = {"Authorization": f"Bearer {key}"}
    return Target(LITELLM, proc, proc.base_url + ROUTE, headers, f"litellm {version}")


def start_portkey(cache: Path, stub: str, work: Path, spawned: list[procs.Proc]) -> Target:
    script, version = install_portkey(cache)
    port = procs.free_port()
    argv = ["node", str(script), f"--port={port}", "--headless"]
    proc = spawn("portkey", argv, work, port, spawned, {"NODE_ENV": "production"})
    procs.wait_http(proc, "/", timeout=60)
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{stub}/v1"}
    return Target(PORTKEY, proc, proc.base_url + ROUTE, headers, f"@portkey-ai/gateway {version}")


def start_stub(work: Path, spawned: list[procs.Proc]) -> Target:
    port = procs.free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--stub-port", str(port)]
    proc = spawn("stub", argv, work, port, spawned)
    procs.wait_http(proc, "/v1/models", timeout=30)
    return Target(DIRECT, proc, proc.base_url + ROUTE, version="aiohttp.web")


def start_backburner(stub: str, work: Path, concurrency: int, spawned: list[procs.Proc]) -> Target:
    config = procs.write_config(
        work / "backburner.toml",
        f"sqlite:///{work}/backburner.db",
        upstream_url=stub,
        max_concurrency=max(64, 4 * concurrency),
        files_dir=str(work / "files"),
    )
    port = procs.free_port()
    argv = procs.backburner_argv("serve", "--config", str(config), "--port", str(port))
    proc = spawn("backburner", argv, work, port, spawned)
    procs.wait_http(proc, "/healthz", timeout=60)
    return Target(BACKBURNER, proc, proc.base_url + ROUTE, version=f"{commit()}, SQLite")


def commit() -> str:
    """The checkout's commit, ``+changes`` when what is served (``src/``) differs from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True)
    except OSError:
        return "unknown commit"
    return head.stdout.decode().strip() + ("+changes" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the instant stub upstream")
    parser.add_argument("--stub-port", type=int, required=True)
    run_stub(parser.parse_args().stub_port)
