"""Fixtures: fake llama-server backends and lcha run with production settings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lcha.app import STATE, State, create_app, make_runner
from lcha.config import parse_config
from lcha.testing.fakellama import FakeLlama

from e2e.processes import ServerProcess, start_lcha


class LchaServer:
    """An lcha application listening on a loopback port."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner = runner
        self.url = url
        self.state: State = runner.app[STATE]

    @property
    def metrics_text(self) -> str:
        return self.state.metrics.render().decode()

    def sample(self, name: str, **labels: str) -> float:
        value = self.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached within timeout")
            await asyncio.sleep(0.01)


@pytest.fixture
async def fakes():
    """Factory: `await fakes(n, slots=2, **options)` starts fake backends."""
    started: list[FakeLlama] = []

    async def make(count: int = 1, **options: Any) -> list[FakeLlama]:
        group = [FakeLlama(**options) for _ in range(count)]
        for fake in group:
            await fake.start()
        started.extend(group)
        return group

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def lcha():
    """Factory: `await lcha(backends, **config)` runs lcha in front of them."""
    servers: list[LchaServer] = []

    async def make(
        backends: list[FakeLlama],
        wait_healthy: bool = True,
        backend_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> LchaServer:
        data: dict[str, Any] = {
            "listen": "127.0.0.1:1",
            "backends": [
                {"name": f"b{i}", "url": fake.url, **(backend_options or {})}
                for i, fake in enumerate(backends)
            ],
            "health": {"interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        config = parse_config(data, environ={})
        runner = make_runner(create_app(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        server = LchaServer(runner, f"http://127.0.0.1:{port}")
        servers.append(server)
        if wait_healthy:
            await server.wait_for(
                lambda: all(b.available for b in server.state.registry) and len(server.state.registry) > 0
            )
        return server

    yield make
    for server in servers:
        await server.runner.cleanup()


@pytest.fixture
async def spawn(tmp_path, monkeypatch):
    """Factory: `await spawn(config, env=None)` runs `python -m lcha` and waits for /health 200."""
    # An outer service manager's socket must not receive this child's messages.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    started: list[ServerProcess] = []

    async def run(config: Any, env: dict[str, str] | None = None) -> ServerProcess:
        server = await asyncio.to_thread(start_lcha, config, tmp_path, env=env, timeout=20.0)
        started.append(server)
        return server

    yield run
    for server in started:
        await asyncio.to_thread(server.stop, 5.0)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
