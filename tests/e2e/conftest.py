"""Fixtures that run real llama-server processes and lcha in front of them.

Tests here need a llama-server binary: set LCHA_LLAMA_SERVER to its path, or
set LCHA_BUILD_LLAMA_SERVER=1 to build one into the cache on first use (about
6 minutes on two cores, measured once). Without either, the tests are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from .llama_server import ENV_BINARY, BuildError, cached_binary_path, find_llama_server
from . import processes
from .processes import ServerProcess
from .tinymodel import write_tiny_model

ENV_BUILD = "LCHA_BUILD_LLAMA_SERVER"

StartLlama = Callable[..., list[ServerProcess]]
StartLcha = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def llama_server_bin(request: pytest.FixtureRequest) -> Path:
    build = os.environ.get(ENV_BUILD, "") not in ("", "0")
    try:
        if build:
            # The build prints progress for several minutes, which pytest
            # would otherwise capture and show only at the end.
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                binary = find_llama_server(build=True)
        else:
            binary = find_llama_server(build=False)
    except BuildError as exc:
        pytest.fail(f"no usable llama-server: {exc}", pytrace=False)

    if binary is None:
        pytest.skip(
            f"no llama-server binary: set {ENV_BINARY}=/path/to/llama-server, or set "
            f"{ENV_BUILD}=1 to build one into {cached_binary_path().parent}"
        )
    return binary


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def start_llama(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> Iterator[StartLlama]:
    """Return a function that starts llama-server processes and waits for /health.

    ``start_llama(count=1, *, embeddings=False, extra_args=(), models_dir=None,
    models_max=None, model=None, timeout=30.0)`` returns a list of
    ServerProcess. With ``models_dir`` the servers run in router mode and get
    no model. Every process is stopped at teardown, also when a test or a
    startup fails.
    """
    servers: list[ServerProcess] = []

    def start(
        count: int = 1,
        *,
        embeddings: bool = False,
        extra_args: Sequence[str] = (),
        models_dir: Path | None = None,
        models_max: int | None = None,
        model: Path | None = None,
        timeout: float = 30.0,
    ) -> list[ServerProcess]:
        started = []
        for _ in range(count):
            options: dict[str, Any] = {
                "name": f"llama{len(servers)}",
                "embeddings": embeddings,
                "extra_args": extra_args,
            }
            if models_dir is not None:
                options.update(models_dir=models_dir, models_max=models_max)
            else:
                options["model"] = model or tiny_model
            server = processes.start_llama_server(
                llama_server_bin, tmp_path / "logs", timeout=timeout, **options
            )
            servers.append(server)
            started.append(server)
        return started

    yield start

    for server in servers:
        server.stop()


@pytest.fixture
def start_lcha(tmp_path: Path) -> Iterator[StartLcha]:
    """Return a function that runs lcha with a config and waits for its /health.

    ``start_lcha(config, *, port=None, timeout=30.0, wait_healthy=True,
    env=None)`` takes the config as a mapping or YAML text. A mapping without
    ``listen`` gets a free loopback port. The returned ServerProcess has
    ``url`` and ``config_path``. At teardown lcha gets SIGTERM, then SIGKILL
    after 10 s.
    """
    started: list[ServerProcess] = []

    def start(
        config: Mapping[str, Any] | str,
        *,
        port: int | None = None,
        timeout: float = 30.0,
        wait_healthy: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        process = processes.start_lcha(
            config,
            tmp_path,
            name=f"lcha{len(started)}",
            port=port,
            timeout=timeout,
            wait_healthy=wait_healthy,
            env=env,
        )
        started.append(process)
        return process

    yield start

    for process in started:
        process.stop()
