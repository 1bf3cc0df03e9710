"""Subprocess helpers for acceptance tests and benchmarks: free loopback ports, bounded waits,
the upstream server and ``backburner serve`` with a temporary config, and SIGKILL.

Every wait here is bounded; a process that dies while being waited for raises at once with the
tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

UPSTREAM_SCRIPT = Path(__file__).with_name("upstream.py")
UPSTREAM_MODEL = "upstream-model"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A started subprocess, its base URL and its log file (stdout and stderr together)."""

    popen: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None) -> Any:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,  # a SIGKILL of ours never reaches the test runner
        )


def wait_http(proc: Proc, path: str, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``GET base_url + path`` until it answers below 500; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{proc.argv[:3]} exited with {proc.popen.returncode} before answering;"
                    f" log tail:\n{proc.log_tail()}"
                )
            try:
                r = client.get(proc.base_url + path)
                if r.status_code < 500:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                kill(proc)
                raise TimeoutError(
                    f"{proc.argv[:3]} did not answer {path} within {timeout}s ({last});"
                    f" log tail:\n{proc.log_tail()}"
                )
            time.sleep(interval)


def start_upstream(
    log_dir: Path,
    *,
    latency_ms: float = 0.0,
    fail_first: int = 0,
    fail_rate: float = 0.0,
    fail_modes: Sequence[str] = (),
    hang_seconds: float | None = None,
    seed: int | None = None,
    poison: bool = False,
    port: int | None = None,
    timeout: float = 20.0,
) -> Proc:
    """Start ``tests/support/upstream.py`` on a free port and wait until it answers (the
    keywords are its options: see its docstring)."""
    port = port or free_port()
    argv = [
        sys.executable,
        str(UPSTREAM_SCRIPT),
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        "--fail-first",
        str(fail_first),
    ]
    if fail_rate:
        argv += ["--fail-rate", str(fail_rate)]
    if fail_modes:
        argv += ["--fail-modes", ",".join(fail_modes)]
    if hang_seconds is not None:
        argv += ["--hang-seconds", str(hang_seconds)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if poison:
        argv.append("--poison")
    log_path = Path(log_dir) / f"upstream-{port}.log"
    proc = Proc(_spawn(argv, log_path, None), f"http://{LOOPBACK}:{port}", log_path, argv)
    wait_http(proc, "/v1/models", timeout)
    return proc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def write_config(
    path: Path,
    database_url: str,
    *,
    upstream_url: str | None = None,
    max_concurrency: int = 32,
    models: Sequence[str] = (UPSTREAM_MODEL,),
    backend_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """A TOML config. With ``upstream_url`` one ``openai`` backend points at it; without, the
    defaults apply (the embedded model). ``settings`` are top-level keys (``lease_seconds=2``);
    ``backend_options`` more keys of that backend (``{"timeout_seconds": 1.0}``)."""
    lines = [f"database_url = {_toml_value(database_url)}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    if upstream_url is not None:
        lines += [
            "",
            "[[backends]]",
            'name = "upstream"',
            'type = "openai"',
            f"base_url = {_toml_value(upstream_url.rstrip('/') + '/v1')}",
            f"models = {_toml_value(list(models))}",
            f"max_concurrency = {int(max_concurrency)}",
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in (backend_options or {}).items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def backburner_argv(*args: str) -> list[str]:
    """The ``backburner`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("backburner")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "from backburner.cli import main; main()", *args]


def start_serve(
    config: Path,
    log_dir: Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Proc:
    """Start ``backburner serve --config CONFIG --port N`` and wait until /healthz answers
    (uvicorn answers only after the app's startup, the worker included, has run)."""
    port = port or free_port()
    argv = backburner_argv("serve", "--config", str(config), "--port", str(port), *extra_args)
    log_path = Path(log_dir) / "serve.log"  # appended to across restarts
    with log_path.open("ab") as log:
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
    proc = Proc(_spawn(argv, log_path, env), f"http://{LOOPBACK}:{port}", log_path, argv)
    wait_http(proc, "/healthz", timeout)
    return proc


def start_worker(
    config: Path,
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """Start ``backburner worker --config CONFIG`` (no HTTP: ``base_url`` is empty). It is not
    waited for: a test sees its work in the database."""
    argv = backburner_argv("worker", "--config", str(config))
    log_path = Path(log_dir) / "worker.log"  # appended to across restarts
    with log_path.open("ab") as log:
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
    return Proc(_spawn(argv, log_path, env), "", log_path, argv)


def run_cli(*args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None) -> str:
    """Run a ``backburner`` command to completion; returns its stdout (raises on failure)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    done = subprocess.run(
        backburner_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"backburner {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def kill(proc: Proc, timeout: float = 10.0) -> None:
    """SIGKILL the process (no cleanup runs in it) and reap it."""
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait(timeout)


def stop(proc: Proc, timeout: float = 20.0) -> None:
    """SIGTERM (a graceful shutdown) and reap; SIGKILL if it does not exit within ``timeout``."""
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    kill(proc)
