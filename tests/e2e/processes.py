"""Start and stop llama-server and lcha processes on loopback ports.

The e2e fixtures in conftest.py and ``scripts/demo`` share these helpers.
Every process gets its own session, so stopping it also stops what it
spawned, such as the per-model children of a llama-server router.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Defaults for e2e backends: one thread each because the test machine may
# have two cores, two slots so that concurrency is observable, and a 2048-token
# context per slot.
LLAMA_DEFAULT_ARGS = ("-t", "1", "-np", "2", "-c", "4096", "--metrics", "--slots")

# An empty ProxyHandler ignores http_proxy and the other proxy variables, so
# requests to the loopback servers never go through a proxy.
_LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_BIND_ATTEMPTS = 3
_STOP_TIMEOUT_SECONDS = 10.0


class ProcessStartError(RuntimeError):
    """Raised when a server process exits or stays unready during startup."""


class ServerProcess:
    """A server subprocess that listens on ``url`` and logs to ``log_path``."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.config_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the process output."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, path: str, *, timeout: float, expect_status: int | None = 200) -> None:
        """Poll ``GET path`` until it returns ``expect_status``, or any status when None.

        Raises ProcessStartError with the output tail when the process exits or
        ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        last = "no response yet"
        while time.monotonic() < deadline:
            if not self.is_running():
                raise ProcessStartError(
                    f"{self.name} exited with code {self.process.returncode} during startup. "
                    f"Output tail:\n{self.log_tail()}"
                )
            status = _http_status(self.url + path)
            if status is not None and (expect_status is None or status == expect_status):
                return
            last = f"status {status}" if status is not None else "connection failed"
            time.sleep(0.05)
        raise ProcessStartError(
            f"{self.name} at {self.url}{path} not ready after {timeout:.0f} s (last: {last}). "
            f"Output tail:\n{self.log_tail()}"
        )

    def send_signal(self, signum: int) -> None:
        if self.is_running():
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = _STOP_TIMEOUT_SECONDS) -> int:
        """Send SIGTERM, then SIGKILL after ``timeout`` seconds, and return the exit code."""
        if self.is_running():
            self.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.process.wait()
        self._kill_leftover_group()
        return self.process.returncode

    def kill(self) -> None:
        """Kill the process group at once, as a crash would."""
        self.send_signal(signal.SIGKILL)
        self.process.wait()
        self._kill_leftover_group()

    def _kill_leftover_group(self) -> None:
        # Router children share the group and may outlive a killed parent.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} pid={self.pid} url={self.url}>"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def spawn_llama_server(
    binary: Path,
    log_dir: Path,
    *,
    name: str = "llama",
    model: Path | None = None,
    models_dir: Path | None = None,
    models_max: int | None = None,
    embeddings: bool = False,
    extra_args: Sequence[str] = (),
) -> ServerProcess:
    """Start llama-server on a free port without waiting for it to become ready.

    Pass ``model`` for one model, or ``models_dir`` for router mode.
    """
    if (model is None) == (models_dir is None):
        raise ValueError("pass exactly one of model and models_dir")
    args = [str(binary), "--host", HOST, *LLAMA_DEFAULT_ARGS]
    if model is not None:
        args += ["-m", str(model)]
    else:
        args += ["--models-dir", str(models_dir)]
        if models_max is not None:
            args += ["--models-max", str(models_max)]
    if embeddings:
        args += ["--embeddings", "--pooling", "mean"]
    args += list(extra_args)
    return _spawn(name, args, log_dir, port_flag="--port")


def start_llama_server(
    binary: Path, log_dir: Path, *, timeout: float = 30.0, **options: Any
) -> ServerProcess:
    """Start llama-server and wait until ``/health`` returns 200.

    Retries on a new port when another process took the chosen port first.
    Takes the keyword arguments of spawn_llama_server.
    """
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        server = spawn_llama_server(binary, log_dir, **options)
        try:
            server.wait_http("/health", timeout=timeout)
            return server
        except ProcessStartError:
            server.stop()
            if attempt < _BIND_ATTEMPTS and "couldn't bind" in server.log_tail():
                continue
            raise
    raise AssertionError("unreachable")


def write_lcha_config(path: Path, config: Mapping[str, Any] | str, port: int | None = None) -> int:
    """Write an lcha YAML config to ``path`` and return the port it listens on.

    A mapping without ``listen`` gets ``127.0.0.1:<port>``, where ``port`` is a
    free port unless given. A string is written as is and must set ``listen``.
    """
    if isinstance(config, str):
        text = config
        listen = yaml.safe_load(text).get("listen", "")
    else:
        config = dict(config)
        config.setdefault("listen", f"{HOST}:{port or free_port()}")
        listen = config["listen"]
        text = yaml.safe_dump(config, sort_keys=False)
    host, sep, port_text = str(listen).rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"lcha config needs listen as HOST:PORT, got {listen!r}")
    path.write_text(text, encoding="utf-8")
    return int(port_text)


def start_lcha(
    config: Mapping[str, Any] | str,
    work_dir: Path,
    *,
    name: str = "lcha",
    port: int | None = None,
    timeout: float = 30.0,
    wait_healthy: bool = True,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Write ``config`` to ``work_dir`` and run ``python -m lcha -c FILE``.

    Waits for lcha's ``/health`` to return 200, or any HTTP status when
    ``wait_healthy`` is false, because lcha returns 503 while no backend is
    healthy.
    """
    config_path = work_dir / f"{name}.yaml"
    listen_port = write_lcha_config(config_path, config, port)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")])
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    if env:
        child_env.update(env)
    args = [sys.executable, "-m", "lcha", "-c", str(config_path)]
    server = _spawn(name, args, work_dir, port=listen_port, env=child_env)
    server.config_path = config_path
    try:
        server.wait_http("/health", timeout=timeout, expect_status=200 if wait_healthy else None)
    except BaseException:
        server.stop()
        raise
    return server


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET ``url`` and decode the JSON body, also for 4xx and 5xx responses."""
    try:
        with _LOOPBACK_OPENER.open(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return json.load(exc)


def _spawn(
    name: str,
    args: list[str],
    log_dir: Path,
    *,
    port_flag: str | None = None,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    if port is None:
        port = free_port()
    if port_flag is not None:
        args = [*args, port_flag, str(port)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = _unique_log_path(log_dir, name)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
    return ServerProcess(name, process, port, log_path)


def _unique_log_path(log_dir: Path, name: str) -> Path:
    for index in range(1000):
        candidate = log_dir / (f"{name}.log" if index == 0 else f"{name}.{index}.log")
        if not candidate.exists():
            return candidate
    raise ProcessStartError(f"more than 1000 logs named {name} in {log_dir}")


def _http_status(url: str) -> int | None:
    try:
        with _LOOPBACK_OPENER.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, ValueError):
        return None
