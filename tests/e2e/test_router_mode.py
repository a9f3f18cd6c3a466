"""lcha in front of real llama-server routers (--models-dir, --models-max 1).

The workload test runs the same interleaved requests over three models twice,
once with model affinity (requests for a loaded model may pass a waiting
load) and once in strict FIFO order, and compares the model loads.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .tinymodel import write_tiny_model

pytestmark = pytest.mark.e2e

MODELS = ("tiny-a", "tiny-b", "tiny-c")
REQUESTS = 36
# Requests start this far apart, so that they reach lcha in the order sent.
ARRIVAL_GAP_SECONDS = 0.005
MAX_TOKENS = 24
# Set to a file path to also write the measured load counts there.
ENV_LOADS_OUT = "LCHA_ROUTER_LOADS_OUT"
SPAWN_MARKER = "spawning server instance with name="


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    for seed, name in enumerate(MODELS):
        write_tiny_model(directory / f"{name}.gguf", seed=seed, name=name)
    return directory


def lcha_config(routers: list[Any], **routing: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": f"r{i}", "url": router.url} for i, router in enumerate(routers)],
        "routing": {"model_unload_delay": "2s", **routing},
        "queue": {"timeout": "120s"},
        "health": {"interval": "250ms", "timeout": "2s", "rise": 1, "fall": 3},
    }


def router_loads(routers: list[Any]) -> int:
    """Count the child processes the routers spawned, one per model load."""
    return sum(router.log_path.read_text(errors="replace").count(SPAWN_MARKER) for router in routers)


async def lcha_loads(session: aiohttp.ClientSession) -> int:
    async with session.get("/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lcha_model_loads_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def complete(session: aiohttp.ClientSession, model: str, stream: bool) -> tuple[int, bool]:
    """Send one completion; return the status and whether the response is whole."""
    body = {
        "model": model,
        "prompt": "hello world",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }
    async with session.post("/v1/completions", json=body) as response:
        raw = await response.read()
        status = response.status
    if status != 200:
        return status, False
    if stream:
        return status, raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
    result = json.loads(raw)
    whole = result["model"] == model and result["usage"]["completion_tokens"] == MAX_TOKENS
    return status, whole


async def interleaved_workload(url: str) -> list[tuple[int, bool]]:
    """Send REQUESTS requests at once, cycling through the models, half of them streamed.

    Clients that wait for each response before the next request fall into
    step and end up sending one model at a time. Requests that all arrive
    together in model order make the queue order decide the loads.
    """
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        tasks = []
        for index in range(REQUESTS):
            model = MODELS[index % len(MODELS)]
            tasks.append(asyncio.create_task(complete(session, model, stream=index % 2 == 0)))
            await asyncio.sleep(ARRIVAL_GAP_SECONDS)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)


async def measure(start_llama, start_lcha, models_dir: Path, max_queue_skip: int) -> dict[str, Any]:
    routers = start_llama(2, models_dir=models_dir, models_max=1)
    lcha = start_lcha(lcha_config(routers, max_queue_skip=max_queue_skip))
    results = await interleaved_workload(lcha.url)
    async with aiohttp.ClientSession(lcha.url) as session:
        loads_seen_by_lcha = await lcha_loads(session)
        async with session.get("/v1/models") as response:
            listed = [model["id"] for model in (await response.json())["data"]]
    lcha.stop()
    for router in routers:
        router.stop()
    return {
        "results": results,
        "router_loads": router_loads(routers),
        "lcha_loads": loads_seen_by_lcha,
        "listed": listed,
    }


async def test_affinity_loads_fewer_than_fifo(start_llama, start_lcha, models_dir: Path) -> None:
    affinity = await measure(start_llama, start_lcha, models_dir, max_queue_skip=8)
    fifo = await measure(start_llama, start_lcha, models_dir, max_queue_skip=0)

    requests = REQUESTS
    report = (
        f"router mode, 2 backends with --models-max 1, 3 models, {requests} requests "
        f"sent together in model order a, b, c, a, ...: "
        f"model loads with max_queue_skip=8: {affinity['router_loads']} "
        f"(lcha counted {affinity['lcha_loads']}); "
        f"with max_queue_skip=0 (strict FIFO): {fifo['router_loads']} "
        f"(lcha counted {fifo['lcha_loads']})"
    )
    print(report)
    out = os.environ.get(ENV_LOADS_OUT)
    if out:
        Path(out).write_text(report + "\n", encoding="utf-8")

    for run in (affinity, fifo):
        assert [status for status, _ in run["results"]] == [200] * requests
        assert all(whole for _, whole in run["results"])
        assert sorted(run["listed"]) == sorted(MODELS)
    assert affinity["router_loads"] < fifo["router_loads"]


async def test_unloaded_model_served_on_idle_backend(
    start_llama, start_lcha, models_dir: Path
) -> None:
    (router,) = start_llama(models_dir=models_dir, models_max=1)
    lcha = start_lcha(lcha_config([router]))
    async with aiohttp.ClientSession(lcha.url) as session:
        first = await complete(session, "tiny-a", stream=False)
        # tiny-a is loaded and idle; tiny-c is not loaded anywhere.
        second = await complete(session, "tiny-c", stream=True)
        loads = await lcha_loads(session)

    assert first == (200, True)
    assert second == (200, True)
    assert loads == 2
    assert router_loads([router]) == 2
