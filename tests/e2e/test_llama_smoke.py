"""Smoke tests of the e2e fixtures against a real llama-server.

They also pin the llama-server behaviour that lcha relies on, so an upgrade
of llama.cpp that changes it fails here first.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import pytest

from .tinymodel import write_tiny_model

pytestmark = pytest.mark.e2e

# ignore_eos: the random model may sample its end-of-text token early, and the
# tests count generated tokens.
CHAT = {
    "messages": [{"role": "user", "content": "hello world"}],
    "max_tokens": 4,
    "ignore_eos": True,
}


async def read_sse(response: aiohttp.ClientResponse) -> list[str]:
    """Return the data fields of an SSE body, asserting the blank-line framing."""
    body = (await response.read()).decode()
    events = body.split("\n\n")
    assert events[-1] == ""
    data = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data.append(event.removeprefix("data: "))
    return data


def test_tiny_model_deterministic(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "a.gguf", seed=3)
    second = write_tiny_model(tmp_path / "b.gguf", seed=3)
    other = write_tiny_model(tmp_path / "c.gguf", seed=4)

    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert first.stat().st_size < 1_000_000


async def test_health_props_slots(start_llama, tiny_model: Path) -> None:
    (server,) = start_llama()
    async with aiohttp.ClientSession(server.url) as session:
        async with session.get("/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with session.get("/props") as response:
            props = await response.json()
        async with session.get("/slots") as response:
            slots = await response.json()
        async with session.get("/v1/models") as response:
            models = await response.json()

    assert props["total_slots"] == 2
    assert [slot["id"] for slot in slots] == [0, 1]
    assert not any(slot["is_processing"] for slot in slots)
    # Without --alias the model id is the -m argument exactly as given.
    assert models["data"][0]["id"] == str(tiny_model)


async def test_chat_completion_timings(start_llama) -> None:
    (server,) = start_llama()
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/chat/completions", json=CHAT) as response:
            first = await response.json()
        async with session.post("/v1/chat/completions", json=CHAT) as response:
            second = await response.json()

    assert first["object"] == "chat.completion"
    assert first["usage"]["completion_tokens"] == 4
    assert first["timings"]["cache_n"] == 0
    assert second["timings"]["cache_n"] == first["usage"]["prompt_tokens"] - 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["timings"]["cache_n"]


async def test_chat_stream_usage_chunk(start_llama) -> None:
    (server,) = start_llama()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            data = await read_sse(response)

    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    # NOTE: this llama-server build (11434.0.0) leaves out the role-only first
    # event in some streams (seen in 4 of 20 and in one CI run), so only the
    # value of any role it sends is checked.
    roles = [
        chunk["choices"][0]["delta"]["role"]
        for chunk in chunks
        if chunk["choices"] and "role" in chunk["choices"][0].get("delta", {})
    ]
    assert set(roles) <= {"assistant"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert "cache_n" in chunks[-1]["timings"]


async def test_completion_endpoints(start_llama) -> None:
    (server,) = start_llama()
    async with aiohttp.ClientSession(server.url) as session:
        completion_body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True}
        async with session.post("/v1/completions", json=completion_body) as response:
            completion = await response.json()
        native_body = {"prompt": "hello", "n_predict": 3, "stream": True, "ignore_eos": True}
        async with session.post("/completion", json=native_body) as response:
            native = [json.loads(item) for item in await read_sse(response)]

    assert completion["object"] == "text_completion"
    assert completion["timings"]["predicted_n"] == 3
    assert native[-1]["stop"] is True
    assert native[-1]["timings"]["predicted_n"] == 3
    assert not any(event["stop"] for event in native[:-1])


async def test_tokenize_and_template(start_llama) -> None:
    (server,) = start_llama()
    messages = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/tokenize", json={"content": "hello world"}) as response:
            tokens = (await response.json())["tokens"]
        async with session.post("/detokenize", json={"tokens": tokens}) as response:
            text = (await response.json())["content"]
        async with session.post("/apply-template", json={"messages": messages}) as response:
            prompt = (await response.json())["prompt"]

    assert text == "hello world"
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


async def test_context_overflow_is_json_error(start_llama) -> None:
    (server,) = start_llama()
    body = {"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 1, "stream": True}
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/chat/completions", json=body) as response:
            error = await response.json()
            status = response.status

    assert status == 400
    assert error["error"]["type"] == "exceed_context_size_error"


async def test_embeddings_mean_pooling(start_llama) -> None:
    (server,) = start_llama(embeddings=True)
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/embeddings", json={"input": ["a", "b"]}) as response:
            result = await response.json()

    assert [item["index"] for item in result["data"]] == [0, 1]
    assert len(result["data"][0]["embedding"]) == 64


async def test_two_servers_distinct_ports(start_llama) -> None:
    servers = start_llama(2)

    assert len({server.port for server in servers}) == 2
    assert all(server.is_running() for server in servers)


async def test_stop_terminates_server(start_llama) -> None:
    (server,) = start_llama()
    returncode = server.stop()

    assert returncode == 0
    assert not server.is_running()


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(tiny_model, directory / "tiny-a.gguf")
    write_tiny_model(directory / "tiny-b.gguf", seed=1, name="tiny-b")
    write_tiny_model(directory / "tiny-c.gguf", seed=2, name="tiny-c")
    return directory


async def model_states(session: aiohttp.ClientSession) -> dict[str, str]:
    async with session.get("/v1/models") as response:
        listing = await response.json()
    return {model["id"]: model["status"]["value"] for model in listing["data"]}


async def test_router_autoload(start_llama, models_dir: Path) -> None:
    (router,) = start_llama(models_dir=models_dir, models_max=1)
    async with aiohttp.ClientSession(router.url) as session:
        initial = await model_states(session)
        async with session.get("/slots", params={"model": "tiny-b", "autoload": "false"}) as response:
            unloaded_status = response.status
        body = {**CHAT, "model": "tiny-b"}
        async with session.post("/v1/chat/completions", json=body) as response:
            reply = await response.json()
        async with session.get("/slots", params={"model": "tiny-b", "autoload": "false"}) as response:
            slots = await response.json()
        loaded = await model_states(session)

    assert initial == {"tiny-a": "unloaded", "tiny-b": "unloaded", "tiny-c": "unloaded"}
    assert unloaded_status == 400
    assert reply["model"] == "tiny-b"
    assert len(slots) == 2
    assert loaded["tiny-b"] == "loaded"


async def test_router_eviction_waits(start_llama, models_dir: Path) -> None:
    (router,) = start_llama(models_dir=models_dir, models_max=1)
    long_body = {"model": "tiny-a", "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
    finished: list[str] = []
    async with aiohttp.ClientSession(router.url) as session:

        async def complete(body: dict) -> dict:
            async with session.post("/v1/completions", json=body) as response:
                assert response.status == 200
                result = await response.json()
            finished.append(body["model"])
            return result

        async def tiny_a_busy() -> bool:
            query = {"model": "tiny-a", "autoload": "false"}
            async with session.get("/slots", params=query) as response:
                if response.status != 200:
                    return False
                return any(slot["is_processing"] for slot in await response.json())

        in_flight = asyncio.create_task(complete(long_body))
        saw_busy = False
        for _ in range(200):
            saw_busy = await tiny_a_busy()
            if saw_busy:
                break
            await asyncio.sleep(0.01)
        evicting = asyncio.create_task(complete({**long_body, "model": "tiny-c", "max_tokens": 2}))
        first, second = await asyncio.wait_for(asyncio.gather(in_flight, evicting), timeout=60)
        states = await model_states(session)

    assert saw_busy
    assert first["usage"]["completion_tokens"] == 1500
    assert second["model"] == "tiny-c"
    assert finished == ["tiny-a", "tiny-c"]
    assert states["tiny-a"] == "unloaded"
    assert states["tiny-c"] == "loaded"


async def test_lcha_fixture_proxies(start_llama, start_lcha) -> None:
    servers = start_llama(2, extra_args=("--alias", "tiny"))
    backends = [{"name": server.name, "url": server.url} for server in servers]
    lcha = start_lcha({"backends": backends})
    async with aiohttp.ClientSession(lcha.url) as session:
        async with session.get("/health") as response:
            health_status = response.status
        async with session.post("/v1/chat/completions", json={**CHAT, "model": "tiny"}) as response:
            reply_status = response.status
            reply = await response.json()
    returncode = lcha.stop()

    assert health_status == 200
    assert reply_status == 200
    assert reply["model"] == "tiny"
    assert lcha.config_path is not None
    assert returncode == 0
