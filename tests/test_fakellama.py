"""Tests of the fake llama-server in lcha.testing.fakellama."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from lcha.testing.fakellama import (
    ROUTER_PROXY_ERROR,
    FakeLlama,
    backends_from_args,
    build_parser,
    serve,
    validate_fault_options,
)

CHAT = "/v1/chat/completions"


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def sse_payloads(raw: bytes) -> list[str]:
    """Return the data fields of an SSE body, in order."""
    return [
        block.removeprefix("data: ")
        for block in raw.decode().split("\n\n")
        if block.startswith("data: ")
    ]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def fake():
    async with FakeLlama(slots=2) as server:
        yield server


async def test_health_ok(fake, session):
    async with session.get(fake.url + "/health") as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body == {"status": "ok"}


async def test_health_while_loading(fake, session):
    fake.loading = True
    async with session.get(fake.url + "/health") as resp:
        body = await resp.json()
    assert resp.status == 503
    assert body == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


async def test_loading_expires_after_seconds(session):
    async with FakeLlama(loading=0.2) as server:
        async with session.get(server.url + "/health") as resp:
            first = resp.status
        await asyncio.sleep(0.25)
        async with session.get(server.url + "/health") as resp:
            second = resp.status
    assert first == 503
    assert second == 200


async def test_props_shape(fake, session):
    async with session.get(fake.url + "/props") as resp:
        props = await resp.json()
    assert props["total_slots"] == 2
    assert props["model_path"] == "/models/tiny.gguf"
    assert props["default_generation_settings"]["n_ctx"] == 4096


async def test_slots_shape(fake, session):
    async with session.get(fake.url + "/slots") as resp:
        slots = await resp.json()
    assert [slot["id"] for slot in slots] == [0, 1]
    assert [slot["is_processing"] for slot in slots] == [False, False]
    assert slots[0]["n_ctx"] == 4096


async def test_models_list(fake, session):
    async with session.get(fake.url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]


async def test_metrics_text(fake, session):
    async with session.get(fake.url + "/metrics") as resp:
        text = await resp.text()
    assert "llamacpp:requests_processing 0" in text
    assert "llamacpp:requests_deferred 0" in text


async def test_unknown_route_404(fake, session):
    async with session.get(fake.url + "/nope") as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["type"] == "not_found_error"


async def test_slot_cap_and_deferral(session):
    async with FakeLlama(slots=2, token_time=0.02, tokens=5) as server:

        async def one(i: int) -> int:
            async with session.post(server.url + CHAT, json=chat_body(f"q{i}")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(6)))
    assert statuses == [200] * 6
    assert server.max_concurrent == 2
    assert server.deferred_total == 4
    assert server.requests_by_route[CHAT] == 6
    assert server.completed == 6


async def test_metrics_count_deferred(session):
    async with FakeLlama(slots=1) as server:
        server.set_fault(hang=True)
        tasks = [
            asyncio.create_task(session.post(server.url + CHAT, json=chat_body(str(i))))
            for i in range(3)
        ]
        await server.wait_until(lambda: server.waiting == 2)
        async with session.get(server.url + "/metrics") as resp:
            text = await resp.text()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert "llamacpp:requests_processing 1" in text
    assert "llamacpp:requests_deferred 2" in text


async def test_prompt_cache_multi_turn(session):
    async with FakeLlama(slots=1, prefill_cost=0.0001) as server:
        question = "a" * 400
        async with session.post(server.url + CHAT, json=chat_body(question)) as resp:
            first = await resp.json()
        reply = first["choices"][0]["message"]["content"]
        turn2 = {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "more"},
            ]
        }
        async with session.post(server.url + CHAT, json=turn2) as resp:
            second = await resp.json()

    first_prompt = f"user: {question}\nassistant: "
    second_prompt = first_prompt + reply + "\nuser: more\nassistant: "
    expected_cache = (len(first_prompt) + len(reply)) // 4
    assert first["timings"]["cache_n"] == 0
    assert first["timings"]["prompt_n"] == -(-len(first_prompt) // 4)
    assert second["timings"]["cache_n"] == expected_cache
    assert second["timings"]["prompt_n"] == -(-len(second_prompt) // 4) - expected_cache
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == expected_cache
    assert second["timings"]["prompt_ms"] == pytest.approx(second["timings"]["prompt_n"] * 0.1)


async def test_prompt_cache_full_hit(fake, session):
    body = {"prompt": "b" * 100}
    async with session.post(fake.url + "/completion", json=body) as resp:
        await resp.read()
    async with session.post(fake.url + "/completion", json=body) as resp:
        again = await resp.json()
    assert again["timings"]["cache_n"] == 24
    assert again["timings"]["prompt_n"] == 1


async def test_prompt_cache_disabled(fake, session):
    body = {"prompt": "b" * 100}
    async with session.post(fake.url + "/completion", json=body) as resp:
        await resp.read()
    async with session.post(fake.url + "/completion", json={**body, "cache_prompt": False}) as resp:
        again = await resp.json()
    assert again["timings"]["cache_n"] == 0


async def test_slot_selection_by_prefix(fake, session):
    async def slot_of(prompt: str) -> int:
        async with session.post(fake.url + "/completion", json={"prompt": prompt}) as resp:
            return (await resp.json())["id_slot"]

    first = await slot_of("x" * 200)
    other = await slot_of("y" * 200)
    back = await slot_of("x" * 200 + " and more")
    assert other != first
    assert back == first


async def test_id_slot_pins_slot(fake, session):
    for _ in range(2):
        async with session.post(fake.url + "/completion", json={"prompt": "p", "id_slot": 1}) as resp:
            body = await resp.json()
        assert body["id_slot"] == 1


async def test_max_tokens_limits_length(fake, session):
    async with session.post(fake.url + CHAT, json=chat_body("hi", max_tokens=3)) as resp:
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_exceed_context_400(session):
    async with (
        FakeLlama(n_ctx=10) as server,
        session.post(server.url + "/completion", json={"prompt": "z" * 100}) as resp,
    ):
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "exceed_context_size_error"
    assert body["error"]["n_ctx"] == 10


async def test_chat_stream_shape(fake, session):
    async with session.post(fake.url + CHAT, json=chat_body("hi", stream=True, max_tokens=2)) as resp:
        events = sse_payloads(await resp.read())
    chunks = [json.loads(e) for e in events[:-1]]
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert chunks[1]["choices"][0]["delta"]["content"] == " The"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["timings"]["predicted_n"] == 2
    assert "usage" not in chunks[-1]
    assert events[-1] == "[DONE]"


async def test_chat_stream_include_usage(fake, session):
    body = chat_body("hi", stream=True, stream_options={"include_usage": True})
    async with session.post(fake.url + CHAT, json=body) as resp:
        events = sse_payloads(await resp.read())
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 16
    assert last["timings"]["cache_n"] == 0
    assert events[-1] == "[DONE]"


async def test_text_stream_shape(fake, session):
    body = {"prompt": "once", "stream": True, "max_tokens": 2}
    async with session.post(fake.url + "/v1/completions", json=body) as resp:
        events = sse_payloads(await resp.read())
    final = json.loads(events[-2])
    assert json.loads(events[0])["object"] == "text_completion"
    assert final["usage"]["completion_tokens"] == 2
    assert events[-1] == "[DONE]"


async def test_native_stream_has_no_done(fake, session):
    body = {"prompt": "once", "stream": True, "n_predict": 2}
    async with session.post(fake.url + "/completion", json=body) as resp:
        events = sse_payloads(await resp.read())
    final = json.loads(events[-1])
    assert len(events) == 3
    assert final["stop"] is True
    assert final["stop_type"] == "limit"


async def test_event_delay_spaces_events(fake, session):
    body = chat_body("hi", stream=True, fake={"event_delay": 0.05, "tokens": 3})
    started = time.monotonic()
    async with session.post(fake.url + CHAT, json=body) as resp:
        await resp.read()
    assert time.monotonic() - started >= 0.15


async def test_content_option(fake, session):
    body = chat_body("hi", fake={"content": "hello world"})
    async with session.post(fake.url + CHAT, json=body) as resp:
        reply = await resp.json()
    assert reply["choices"][0]["message"]["content"] == "hello world"
    assert reply["usage"]["completion_tokens"] == 3


async def test_reset_after_events(fake, session):
    body = chat_body("hi", stream=True, fake={"reset_after": 2})
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientError):
        async with session.post(fake.url + CHAT, json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    received.append(line)
    assert len(received) == 2
    assert fake.client_disconnects == 0
    assert fake.faults_applied["reset_after"] == 1


async def test_reset_before_headers_once(fake, session):
    fake.add_fault(reset=True)
    with pytest.raises(aiohttp.ClientError):
        async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
            await resp.read()
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        await resp.read()
    assert resp.status == 200


async def test_close_after_events(fake, session):
    body = chat_body("hi", stream=True, fake={"close_after": 1})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(fake.url + CHAT, json=body) as resp:
            await resp.read()


async def test_truncate_non_stream(fake, session):
    body = chat_body("hi", fake={"truncate": True})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(fake.url + CHAT, json=body) as resp:
            await resp.read()


async def test_error_after_events(fake, session):
    body = chat_body("hi", stream=True, fake={"error_after": 1})
    async with session.post(fake.url + CHAT, json=body) as resp:
        events = sse_payloads(await resp.read())
    assert len(events) == 2
    assert json.loads(events[-1])["error"]["code"] == 500


async def test_no_done_option(fake, session):
    body = chat_body("hi", stream=True, fake={"no_done": True})
    async with session.post(fake.url + CHAT, json=body) as resp:
        events = sse_payloads(await resp.read())
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["choices"][0]["finish_reason"] == "stop"


async def test_invalid_utf8_option(fake, session):
    body = chat_body("hi", stream=True, fake={"invalid_utf8": True})
    async with session.post(fake.url + CHAT, json=body) as resp:
        raw = await resp.read()
    with pytest.raises(UnicodeDecodeError):
        raw.decode()


async def test_status_fault(fake, session):
    fake.set_fault(status=502, body={"error": {"code": 502, "message": "bad"}})
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        failed = await resp.json()
    fake.clear_faults()
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        await resp.read()
    assert failed["error"]["message"] == "bad"
    assert resp.status == 200
    assert fake.responses_by_status[502] == 1


async def test_fault_on_health_route(fake, session):
    fake.add_fault(routes=["/health"], status=500, body="down")
    async with session.get(fake.url + "/health") as resp:
        text = await resp.text()
    assert resp.status == 500
    assert text == "down"


async def test_queued_faults_apply_in_order(fake, session):
    fake.add_fault(status=500)
    fake.add_fault(status=503)
    statuses = []
    for _ in range(3):
        async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
            await resp.read()
            statuses.append(resp.status)
    assert statuses == [500, 503, 200]


async def test_unknown_fake_option_400(fake, session):
    async with session.post(fake.url + CHAT, json=chat_body("hi", fake={"hangg": True})) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert "hangg" in body["error"]["message"]


async def test_validate_rejects_bool_number():
    with pytest.raises(ValueError):
        validate_fault_options({"tokens": True})


async def test_hang_disconnect_recorded(fake, session):
    body = chat_body("hi", fake={"hang": True})
    with pytest.raises(asyncio.TimeoutError):
        await session.post(fake.url + CHAT, json=body, timeout=aiohttp.ClientTimeout(total=0.2))
    gave_up = time.monotonic()
    noticed = await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=1.0)
    assert noticed
    assert fake.last_disconnect_at - gave_up < 1.0
    assert fake.disconnects_by_stage["prefill"] == 1
    assert fake.processing == 0


async def test_disconnect_while_queued(session):
    async with FakeLlama(slots=1) as server:
        holder = asyncio.create_task(
            session.post(server.url + CHAT, json=chat_body("a", fake={"hang": True}))
        )
        await server.wait_until(lambda: server.processing == 1)
        queued = asyncio.create_task(session.post(server.url + CHAT, json=chat_body("b")))
        await server.wait_until(lambda: server.waiting == 1)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        noticed = await server.wait_until(lambda: server.client_disconnects == 1)
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    assert noticed
    assert server.disconnects_by_stage["queued"] == 1
    assert server.deferred_total == 1


async def test_stop_aborts_inflight(session):
    server = FakeLlama()
    await server.start()
    request = asyncio.create_task(
        session.post(server.url + CHAT, json=chat_body("hi", fake={"hang": True}))
    )
    await server.wait_until(lambda: server.processing == 1)
    await server.stop()
    result = (await asyncio.gather(request, return_exceptions=True))[0]
    assert isinstance(result, aiohttp.ClientError)
    assert server.client_disconnects == 0


async def test_restart_same_port(session):
    server = FakeLlama(slots=2)
    await server.start()
    port = server.port
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(server.url + "/health") as resp:
            await resp.read()
    await server.start(slots=3)
    try:
        async with session.get(server.url + "/props") as resp:
            props = await resp.json()
    finally:
        await server.stop()
    assert server.port == port
    assert props["total_slots"] == 3
    assert server.starts == 2


async def test_api_key_required(session):
    async with FakeLlama(api_key="secret") as server:
        async with session.get(server.url + "/props") as resp:
            denied = resp.status
        async with session.get(server.url + "/props", headers={"Authorization": "Bearer secret"}) as resp:
            allowed = resp.status
        async with session.get(server.url + "/health") as resp:
            health = resp.status
    assert denied == 401
    assert allowed == 200
    assert health == 200


async def test_embeddings_shapes(fake, session):
    async with session.post(fake.url + "/v1/embeddings", json={"input": ["a", "b"]}) as resp:
        oai = await resp.json()
    async with session.post(fake.url + "/embedding", json={"content": "a"}) as resp:
        native = await resp.json()
    assert [item["index"] for item in oai["data"]] == [0, 1]
    assert oai["data"][0]["embedding"] == native[0]["embedding"][0]
    assert oai["usage"]["prompt_tokens"] == 2


async def test_rerank_sorted(fake, session):
    body = {"query": "red fox", "documents": ["blue sky", "red fox", "red car"]}
    async with session.post(fake.url + "/v1/rerank", json=body) as resp:
        ranked = await resp.json()
    assert [r["index"] for r in ranked["results"]] == [1, 2, 0]


async def test_tokenize_roundtrip(fake, session):
    async with session.post(fake.url + "/tokenize", json={"content": "hello world"}) as resp:
        tokens = (await resp.json())["tokens"]
    async with session.post(fake.url + "/detokenize", json={"tokens": tokens}) as resp:
        text = (await resp.json())["content"]
    assert len(tokens) == 3
    assert text == "hello world"


async def test_fake_stats_endpoint(fake, session):
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        await resp.read()
    async with session.get(fake.url + "/fake/stats") as resp:
        stats = await resp.json()
    assert stats["requests_by_route"][CHAT] == 1
    assert stats["max_concurrent"] == 1


async def test_fake_fault_endpoint(fake, session):
    async with session.post(fake.url + "/fake/fault", json={"times": 1, "status": 503}) as resp:
        assert resp.status == 200
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        first = resp.status
    async with session.post(fake.url + CHAT, json=chat_body("hi")) as resp:
        second = resp.status
    assert first == 503
    assert second == 200


@pytest.fixture
async def router():
    server = FakeLlama(slots=1, router=True, models=["a", "b", "c"], models_max=1, load_time=0.05)
    async with server:
        yield server


async def test_router_models_status(router, session):
    async with session.post(router.url + CHAT, json=chat_body("hi", model="a")) as resp:
        await resp.read()
    async with session.get(router.url + "/v1/models") as resp:
        models = await resp.json()
    statuses = {m["id"]: m["status"]["value"] for m in models["data"]}
    assert statuses == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
    assert router.loads["a"] == 1


async def test_router_slots_need_model(router, session):
    async with session.get(router.url + "/slots") as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["message"] == "model name is missing from the request"


async def test_router_slots_without_autoload(router, session):
    async with session.get(router.url + "/slots?model=b&autoload=false") as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["message"] == "model is not loaded"


async def test_router_unknown_model(router, session):
    async with session.post(router.url + CHAT, json=chat_body("hi", model="zzz")) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["message"] == "model 'zzz' not found"


async def test_router_evict_busy_aborts(router, session):
    router.evict_busy = True
    slow = chat_body("hi", model="a", stream=True, fake={"event_delay": 0.1, "tokens": 50})
    async with session.post(router.url + CHAT, json=slow) as resp:
        await resp.content.readline()
        async with session.post(router.url + CHAT, json=chat_body("hi", model="b")) as other:
            await other.read()
        tail = await resp.read()
    assert other.status == 200
    assert tail.endswith(ROUTER_PROXY_ERROR.encode())
    assert router.aborted_by_unload == 1
    assert router.unloads["a"] == 1
    assert router.loads["b"] == 1
    assert router.model_status("a") == "unloaded"


async def test_router_evicts_idle_model(router, session):
    for name in ("a", "b"):
        async with session.post(router.url + CHAT, json=chat_body("hi", model=name)) as resp:
            await resp.read()
    assert router.model_status("a") == "unloaded"
    assert router.model_status("b") == "loaded"
    assert router.unloads["a"] == 1
    assert router.aborted_by_unload == 0


async def test_router_closes_proxied_connections(router, session):
    async with session.post(router.url + CHAT, json=chat_body("hi", model="a")) as resp:
        await resp.read()
    async with session.get(router.url + "/v1/models") as listing:
        await listing.read()
    assert resp.headers["Connection"] == "close"
    assert "Connection" not in listing.headers


async def test_router_waits_for_busy_model(session):
    server = FakeLlama(slots=1, router=True, models=["a", "b"], models_max=1)
    async with server:
        slow = chat_body("hi", model="a", fake={"headers_delay": 0.2})
        first = asyncio.create_task(session.post(server.url + CHAT, json=slow))
        await server.wait_until(lambda: server.processing == 1)
        waiting = asyncio.create_task(session.post(server.url + CHAT, json=chat_body("hi", model="b")))
        await asyncio.sleep(0.05)
        status_while_busy = server.model_status("b")
        first_resp = await first
        first_resp.release()
        resp = await waiting
        resp.release()
    assert status_while_busy == "unloaded"
    assert first_resp.status == 200
    assert resp.status == 200
    assert server.aborted_by_unload == 0


def free_port_pair() -> int:
    """Return a port p such that p and p + 1 were both free a moment ago."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found")


async def test_cli_count_consecutive_ports(session):
    port = free_port_pair()
    args = build_parser().parse_args(["--port", str(port), "--count", "2", "--slots", "3"])
    backends = backends_from_args(args)
    stop = asyncio.Event()
    runner = asyncio.create_task(serve(backends, stop))
    try:
        await backends[1].wait_until(lambda: backends[1].running)
        statuses = []
        for backend in backends:
            async with session.get(backend.url + "/props") as resp:
                statuses.append((resp.status, (await resp.json())["total_slots"]))
    finally:
        stop.set()
        await runner
    assert [b.port for b in backends] == [port, port + 1]
    assert statuses == [(200, 3), (200, 3)]


async def test_health_hang_fault(fake, session):
    fake.add_fault(routes=["/health"], hang=True)
    with pytest.raises(asyncio.TimeoutError):
        await session.get(fake.url + "/health", timeout=aiohttp.ClientTimeout(total=0.1))
    async with session.get(fake.url + "/health") as resp:
        await resp.read()
    assert resp.status == 200


async def test_status_fault_waits_headers_delay(fake, session):
    fake.add_fault(routes="*", status=500, headers_delay=0.1)
    started = time.monotonic()
    async with session.get(fake.url + "/props") as resp:
        await resp.read()
    assert resp.status == 500
    assert time.monotonic() - started >= 0.1


async def test_stream_pings_during_long_prefill(session):
    async with FakeLlama(sse_ping_interval=0.03, prefill_cost=0.001) as server:
        body = {"prompt": "q" * 400, "stream": True, "n_predict": 1}
        async with session.post(server.url + "/completion", json=body) as resp:
            raw = await resp.read()
    assert raw.startswith(b":\n\n")


async def test_router_slots_autoload(router, session):
    async with session.get(router.url + "/slots?model=c") as resp:
        slots = await resp.json()
    assert [slot["id"] for slot in slots] == [0]
    assert router.model_status("c") == "loaded"


async def test_stream_headers_before_prefill(session):
    async with FakeLlama(prefill_cost=0.001) as server:
        body = {"prompt": "w" * 800, "stream": True, "n_predict": 1}
        started = time.monotonic()
        async with session.post(server.url + "/completion", json=body) as resp:
            headers_after = time.monotonic() - started
            await resp.read()
        total = time.monotonic() - started
    assert headers_after < 0.15
    assert total >= 0.2


async def test_router_unload_model_api(router, session):
    await router.load_model("b")
    router.unload_model("b")
    async with session.get(router.url + "/v1/models") as resp:
        models = await resp.json()
    statuses = {m["id"]: m["status"]["value"] for m in models["data"]}
    assert statuses["b"] == "unloaded"
    assert router.loads["b"] == 1
    assert router.unloads["b"] == 1


# -- host prompt cache ------------------------------------------------------------


async def complete(session, server, prompt: str, **extra: Any) -> dict[str, Any]:
    async with session.post(server.url + "/completion", json={"prompt": prompt, **extra}) as resp:
        return await resp.json()


async def test_host_cache_restores_prompt(session):
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=-1) as server:
        first = "a" * 400
        await complete(session, server, first)
        await complete(session, server, "b" * 400)
        again = await complete(session, server, first + " The" + "c" * 40)
    assert again["timings"]["cache_n"] == 101
    assert server.stats()["prompt_cache"]["restores"] == 1


async def test_host_cache_off_by_default(session):
    async with FakeLlama(slots=1, tokens=1) as server:
        first = "a" * 400
        await complete(session, server, first)
        await complete(session, server, "b" * 400)
        again = await complete(session, server, first + " The" + "c" * 40)
    assert again["timings"]["cache_n"] == 0
    assert server.stats()["prompt_cache"]["saves"] == 0


async def test_host_cache_evicts_oldest(session):
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=150) as server:
        first = "a" * 400
        await complete(session, server, first)
        await complete(session, server, "b" * 400)
        await complete(session, server, "c" * 400)
        again = await complete(session, server, first + " The")
        stats = server.stats()["prompt_cache"]
    assert again["timings"]["cache_n"] == 0
    assert stats["tokens"] <= 150


async def test_host_cache_skips_oversized_prompt(session):
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=50) as server:
        await complete(session, server, "a" * 400)
        await complete(session, server, "b" * 100)
        stats = server.stats()["prompt_cache"]
    assert stats["prompts"] == 0


async def test_host_cache_unused_for_similar_slot(session):
    # llama-server consults its cache only when the chosen slot would lose
    # more than half of its prompt. Here the slot keeps 40 of 74 characters.
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=-1) as server:
        saved = "s" * 40 + "p" * 60
        await complete(session, server, saved)
        await complete(session, server, "s" * 40 + "x" * 30)
        again = await complete(session, server, saved + " The" + "q" * 20)
    assert again["timings"]["cache_n"] == 10
    assert server.stats()["prompt_cache"]["restores"] == 0


async def test_host_cache_keeps_better_slot(session):
    # The saved "z"*20 prompt keeps more of itself than the slot would, but
    # covers less of the new prompt, so the slot keeps its own 30 characters.
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=-1) as server:
        await complete(session, server, "z" * 20 + "y" * 20)
        await complete(session, server, "z" * 30 + "k" * 400)
        again = await complete(session, server, "z" * 30 + "w" * 400)
    assert again["timings"]["cache_n"] == 7
    assert server.stats()["prompt_cache"]["restores"] == 0


async def test_host_cache_saves_idle_slots(session):
    async with FakeLlama(slots=2, tokens=1, prompt_cache_tokens=-1) as server:
        await complete(session, server, "a" * 400)
        await complete(session, server, "b" * 400)
        stats = server.stats()["prompt_cache"]
    assert stats["prompts"] == 1


async def test_host_cache_idle_slots_off(session):
    async with FakeLlama(slots=2, tokens=1, prompt_cache_tokens=-1, cache_idle_slots=False) as server:
        await complete(session, server, "a" * 400)
        await complete(session, server, "b" * 400)
        stats = server.stats()["prompt_cache"]
    assert stats["prompts"] == 0


async def test_host_cache_restore_cost(session):
    async with FakeLlama(slots=1, tokens=1, prompt_cache_tokens=-1, restore_cost=0.001) as server:
        first = "a" * 400
        await complete(session, server, first)
        await complete(session, server, "b" * 400)
        started = time.monotonic()
        again = await complete(session, server, first + " The")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.1
    assert again["timings"]["prompt_ms"] == 0.0


async def test_erase_caches_endpoint(session):
    async with FakeLlama(slots=2, tokens=1, prompt_cache_tokens=-1) as server:
        await complete(session, server, "a" * 400)
        await complete(session, server, "b" * 400)
        async with session.delete(server.url + "/fake/cache") as resp:
            await resp.read()
        again = await complete(session, server, "a" * 400)
        stats = server.stats()["prompt_cache"]
    assert resp.status == 200
    assert again["timings"]["cache_n"] == 0
    assert stats["prompts"] == 0


async def test_cli_prompt_cache_options():
    args = build_parser().parse_args(
        ["--prompt-cache-tokens", "5000", "--no-cache-idle-slots", "--restore-cost", "0.00001"]
    )
    backend = backends_from_args(args)[0]
    assert backend.prompt_cache_tokens == 5000
    assert backend.cache_idle_slots is False
    assert backend.restore_cost == 0.00001


async def test_prompt_cache_tokens_rejects_negative():
    with pytest.raises(ValueError):
        FakeLlama(prompt_cache_tokens=-2)
