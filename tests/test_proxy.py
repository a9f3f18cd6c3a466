"""lcha in front of fake llama-server backends, run with production settings."""

import asyncio
import json
import time
from types import SimpleNamespace

import aiohttp
import pytest

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


async def post(http, server, path, body, **kwargs):
    async with http.post(server.url + path, json=body, **kwargs) as response:
        return response.status, await response.read(), response.headers


async def read_stream(response):
    return b"".join([chunk async for chunk in response.content.iter_any()])


def error_of(body):
    payload = json.loads(body)
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


async def test_chat_non_stream(fakes, lcha, http):
    server = await lcha(await fakes(2))
    status, body, headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 200
    assert json.loads(body)["object"] == "chat.completion"
    assert headers["X-Lcha-Backend"] in ("b0", "b1")
    assert headers["X-Request-Id"]


async def test_chat_stream_ends_with_done(fakes, lcha, http):
    server = await lcha(await fakes(1))
    async with http.post(server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        body = await read_stream(response)
    assert body.rstrip().endswith(b"data: [DONE]")


async def test_native_completion_stream_without_done(fakes, lcha, http):
    server = await lcha(await fakes(1))
    async with http.post(
        server.url + "/completion", json={"prompt": "hi", "n_predict": 3, "stream": True}
    ) as response:
        body = await read_stream(response)
    assert response.status == 200
    assert b"[DONE]" not in body
    assert b'"stop":true' in body
    assert b'"error"' not in body


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/completion", {"prompt": "hi", "n_predict": 2}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/tokenize", {"content": "hi"}),
        ("/detokenize", {"tokens": [1, 2]}),
        ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/infill", {"input_prefix": "a", "input_suffix": "b"}),
    ],
)
async def test_routes_forwarded(fakes, lcha, http, path, body):
    server = await lcha(await fakes(1))
    status, _body, _headers = await post(http, server, path, body)
    assert status == 200


async def test_catch_all_forwards_get(fakes, lcha, http):
    server = await lcha(await fakes(1, slots=3))
    async with http.get(server.url + "/props") as response:
        assert response.status == 200
        assert (await response.json())["total_slots"] == 3


async def test_models_union_listed_once(fakes, lcha, http):
    backends = await fakes(2, model="alpha") + await fakes(1, model="beta")
    server = await lcha(backends)
    async with http.get(server.url + "/v1/models") as response:
        data = (await response.json())["data"]
    assert sorted(m["id"] for m in data) == ["alpha", "beta"]
    alpha = next(m for m in data if m["id"] == "alpha")
    assert alpha["backends"] == ["b0", "b1"]


async def test_model_routing_by_name(fakes, lcha, http):
    alpha, beta = await fakes(1, model="alpha") + await fakes(1, model="beta")
    server = await lcha([alpha, beta])
    for _ in range(3):
        status, _body, headers = await post(
            http, server, "/v1/chat/completions", {**CHAT, "model": "beta"}
        )
        assert status == 200
        assert headers["X-Lcha-Backend"] == "b1"
    assert alpha.requests_by_route["/v1/chat/completions"] == 0


async def test_health_reports_summary(fakes, lcha, http):
    backends = await fakes(2, slots=3)
    server = await lcha(backends)
    async with http.get(server.url + "/health") as response:
        summary = await response.json()
    assert response.status == 200
    assert summary["status"] == "ok"
    assert summary["backends"]["healthy"] == 2
    assert summary["slots"] == {"total": 6, "busy": 0, "free": 6}
    for fake in backends:
        await fake.stop()
    await server.wait_for(lambda: not any(b.available for b in server.state.registry))
    async with http.get(server.url + "/health") as response:
        assert response.status == 503


async def test_slot_cap_three_times_capacity(fakes, lcha, http):
    backends = await fakes(2, slots=2, token_time=0.01, tokens=10)
    server = await lcha(backends)

    async def one(i):
        body = {**CHAT, "stream": i % 2 == 0}
        async with http.post(server.url + "/v1/chat/completions", json=body) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one(i) for i in range(12)))
    assert statuses == [200] * 12
    for fake in backends:
        assert fake.max_concurrent <= 2
        assert fake.deferred_total == 0
    assert [b.inflight for b in server.state.registry] == [0, 0]


async def test_queue_full_is_429(fakes, lcha, http):
    (fake,) = await fakes(1, slots=1, token_time=0.05, tokens=20)
    server = await lcha([fake], queue={"max_size": 1})
    first = asyncio.create_task(post(http, server, "/v1/chat/completions", CHAT))
    await server.wait_for(lambda: fake.processing == 1)
    second = asyncio.create_task(post(http, server, "/v1/chat/completions", CHAT))
    await server.wait_for(lambda: len(server.state.dispatcher) == 1)
    status, body, headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 429
    assert headers["Retry-After"]
    assert error_of(body)["code"] == "queue_full"
    assert (await first)[0] == 200
    assert (await second)[0] == 200
    assert server.sample("lcha_rejections_total", reason="queue_full") == 1


async def test_queue_timeout_is_503(fakes, lcha, http):
    (fake,) = await fakes(1, slots=1, token_time=0.1, tokens=10)
    server = await lcha([fake], queue={"timeout": "200ms"})
    first = asyncio.create_task(post(http, server, "/v1/chat/completions", CHAT))
    await server.wait_for(lambda: fake.processing == 1)
    started = time.monotonic()
    status, body, headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 503
    assert time.monotonic() - started < 1.0
    assert headers["Retry-After"]
    assert error_of(body)["code"] == "queue_timeout"
    assert (await first)[0] == 200
    assert fake.requests_by_route["/v1/chat/completions"] == 1


async def test_disconnect_while_queued_never_dispatched(fakes, lcha, http):
    (fake,) = await fakes(1, slots=1, token_time=0.05, tokens=10)
    server = await lcha([fake])
    first = asyncio.create_task(post(http, server, "/v1/chat/completions", CHAT))
    await server.wait_for(lambda: fake.processing == 1)
    gone = asyncio.create_task(post(http, server, "/v1/chat/completions", CHAT))
    await server.wait_for(lambda: len(server.state.dispatcher) == 1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    await server.wait_for(lambda: len(server.state.dispatcher) == 0)
    assert (await first)[0] == 200
    await asyncio.sleep(0.1)
    assert fake.requests_by_route["/v1/chat/completions"] == 1
    assert server.state.registry.get("b0").inflight == 0
    assert server.sample("lcha_client_aborts_total", route="/v1/chat/completions", stage="queued") == 1


async def test_disconnect_mid_stream_closes_upstream(fakes, lcha):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake])
    body = {**CHAT, "stream": True, "fake": {"event_delay": 0.05, "tokens": 200}}
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.url + "/v1/chat/completions", json=body)
        await response.content.readany()
        closed_at = time.monotonic()
        response.close()
    assert await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=2)
    assert fake.last_disconnect_at - closed_at < 1.0
    await server.wait_for(lambda: server.state.registry.get("b0").inflight == 0, timeout=1)


async def test_disconnect_during_prefill_closes_upstream(fakes, lcha):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake])
    body = {**CHAT, "fake": {"headers_delay": 30}}
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(server.url + "/v1/chat/completions", json=body))
        await server.wait_for(lambda: fake.processing == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        closed_at = time.monotonic()
    assert await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=2)
    assert fake.last_disconnect_at - closed_at < 1.0
    await server.wait_for(lambda: server.state.registry.get("b0").inflight == 0, timeout=1)


async def test_retry_on_refused_connection(fakes, lcha, http):
    dead, alive = await fakes(2)
    server = await lcha([dead, alive])
    await dead.stop()
    statuses = []
    for _ in range(4):
        status, _body, headers = await post(http, server, "/v1/chat/completions", CHAT)
        statuses.append(status)
        assert headers["X-Lcha-Backend"] == "b1"
    assert statuses == [200] * 4


async def test_retry_on_503_before_first_byte(fakes, lcha, http):
    flaky, good = await fakes(2)
    flaky.set_fault(status=503, body={"error": {"code": 503, "message": "busy"}})
    server = await lcha([flaky, good], routing={"policy": "round_robin"})
    for _ in range(2):
        status, _body, headers = await post(http, server, "/v1/chat/completions", CHAT)
        assert status == 200
        assert headers["X-Lcha-Backend"] == "b1"
    assert server.sample("lcha_retries_total", backend="b0") >= 1


async def test_no_retry_after_stream_started(fakes, lcha, http):
    broken, other = await fakes(2)
    broken.set_fault(reset_after=3)
    server = await lcha([broken, other], routing={"policy": "round_robin"})
    async with http.post(
        server.url + "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 10}
    ) as response:
        assert response.status == 200
        chunks = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
    body = b"".join(chunks)
    assert response.headers["X-Lcha-Backend"] == "b0"
    assert b"[DONE]" not in body
    assert b'"error"' in body
    assert other.requests_by_route["/v1/chat/completions"] == 0


async def test_truncated_non_stream_is_502(fakes, lcha, http):
    (fake,) = await fakes(1)
    fake.set_fault(truncate=True)
    server = await lcha([fake])
    status, body, _headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 502
    assert error_of(body)["code"] == "upstream_truncated"


async def test_stream_without_done_is_error(fakes, lcha, http):
    (fake,) = await fakes(1)
    fake.set_fault(no_done=True)
    server = await lcha([fake])
    async with http.post(server.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        chunks = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
    assert b'"error"' in b"".join(chunks)


async def test_affinity_keeps_conversation(fakes, lcha, http):
    server = await lcha(await fakes(3, slots=4))
    turn1 = {"messages": [{"role": "user", "content": "tell me about cats"}], "max_tokens": 2}
    _status, body, headers = await post(http, server, "/v1/chat/completions", turn1)
    first = headers["X-Lcha-Backend"]
    messages = turn1["messages"] + [{"role": "assistant", "content": "cats purr"}]
    for turn in range(4):
        messages = messages + [{"role": "user", "content": f"more {turn}"}]
        _status, _body, headers = await post(
            http, server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}
        )
        assert headers["X-Lcha-Backend"] == first
        messages = messages + [{"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer sk-one"}, 200),
        ({"X-Api-Key": "sk-two"}, 200),
    ],
)
async def test_api_keys(fakes, lcha, http, headers, status):
    (fake,) = await fakes(1)
    server = await lcha([fake], api_keys=["sk-one", "sk-two"])
    got, body, _headers = await post(http, server, "/v1/chat/completions", CHAT, headers=headers)
    assert got == status
    if status == 401:
        assert error_of(body)["type"] == "authentication_error"
        assert fake.requests_by_route["/v1/chat/completions"] == 0
        assert len(server.state.dispatcher) == 0


async def test_health_and_metrics_need_no_key(fakes, lcha, http):
    server = await lcha(await fakes(1), api_keys=["sk-one"])
    async with http.get(server.url + "/health") as response:
        assert response.status == 200
    async with http.get(server.url + "/metrics") as response:
        assert response.status == 200


async def test_client_credentials_not_forwarded(fakes, lcha, http):
    (fake,) = await fakes(1, api_key="backend-secret")
    server = await lcha(
        [fake], api_keys=["sk-client"], backend_options={"api_key": "backend-secret"}
    )
    status, _body, _headers = await post(
        http,
        server,
        "/v1/chat/completions",
        CHAT,
        headers={"Authorization": "Bearer sk-client", "Cookie": "session=1"},
    )
    # The fake checks for its own key: the client's key would be rejected.
    assert status == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        (json.dumps({**CHAT, "model": 7}).encode(), 400, None),
        (json.dumps({**CHAT, "model": "nope"}).encode(), 404, "model_not_found"),
        (json.dumps({**CHAT, "model": "TINY"}).encode(), 404, "model_not_found"),
        (json.dumps({**CHAT, "model": "tiny "}).encode(), 404, "model_not_found"),
    ],
)
async def test_bad_requests_are_openai_errors(fakes, lcha, http, body, status, code):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    async with http.post(
        server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        error = error_of(await response.read())
    if code:
        assert error["code"] == code
    assert fake.requests_by_route["/v1/chat/completions"] == 0


async def test_body_too_large_is_413(fakes, lcha, http):
    (fake,) = await fakes(1)
    server = await lcha([fake], max_body_size="1KiB")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
    status, body, _headers = await post(http, server, "/v1/chat/completions", big)
    assert status == 413
    assert error_of(body)["code"] == "request_too_large"
    assert fake.requests_by_route["/v1/chat/completions"] == 0


async def test_no_healthy_backend_is_503(fakes, lcha, http):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    await fake.stop()
    await server.wait_for(lambda: not server.state.registry.get("b0").available)
    status, body, _headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 503
    assert error_of(body)["code"] == "no_backend"


async def test_loading_backend_gets_no_traffic(fakes, lcha, http):
    loading, ready = await fakes(2)
    loading.set_loading(True)
    server = await lcha([loading, ready], wait_healthy=False)
    await server.wait_for(lambda: server.state.registry.get("b1").available)
    await server.wait_for(lambda: server.state.registry.get("b0").state == "loading")
    for _ in range(3):
        _status, _body, headers = await post(http, server, "/v1/chat/completions", CHAT)
        assert headers["X-Lcha-Backend"] == "b1"
    loading.set_loading(False)
    await server.wait_for(lambda: server.state.registry.get("b0").available)


async def test_metrics_count_requests(fakes, lcha, http):
    server = await lcha(await fakes(1, model="tiny"))
    for _ in range(3):
        await post(http, server, "/v1/chat/completions", {**CHAT, "model": "tiny"})
    await post(http, server, "/v1/chat/completions", {**CHAT, "model": "absent"})
    assert server.sample("lcha_requests_total", route="/v1/chat/completions", model="tiny") == 3
    assert server.sample(
        "lcha_responses_total", route="/v1/chat/completions", model="tiny", status="200"
    ) == 3
    assert server.sample("lcha_rejections_total", reason="model_not_found") == 1
    assert server.sample("lcha_dispatches_total", backend="b0", model="tiny") == 3
    assert server.sample("lcha_prompt_tokens_total", backend="b0", model="tiny") > 0
    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    assert 'lcha_backend_slots{backend="b0"} 2.0' in text
    assert 'lcha_backend_state{backend="b0",state="healthy"} 1.0' in text


async def test_external_client_slots_count_as_taken(fakes, lcha, http):
    (fake,) = await fakes(1, slots=2)
    server = await lcha([fake])
    # Another client uses the backend directly and occupies one of its slots.
    direct = asyncio.create_task(
        post(
            http,
            SimpleNamespace(url=fake.url),
            "/v1/chat/completions",
            {**CHAT, "fake": {"headers_delay": 1.0}},
        )
    )
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.external_busy == 1)
    statuses = await asyncio.gather(
        *(post(http, server, "/v1/chat/completions", CHAT) for _ in range(4))
    )
    assert [status for status, _body, _headers in statuses] == [200] * 4
    assert fake.max_concurrent == 2
    assert fake.deferred_total == 0
    await direct


async def test_hung_busy_backend_ejected(fakes, lcha, http):
    hung, good = await fakes(2)
    server = await lcha(
        [hung, good], health={"interval": "100ms", "timeout": "200ms", "fall": 2}
    )
    hung.set_fault(routes="*", hang=True)
    # A request in flight on the hung backend must not shield it from checks.
    stuck = asyncio.create_task(
        post(http, server, "/v1/chat/completions", {**CHAT, "model": "tiny"})
    )
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.inflight == 1 or stuck.done())
    await server.wait_for(lambda: backend.state == "unhealthy", timeout=10)
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)


async def test_backend_rejecting_key_is_unhealthy(fakes, lcha):
    (fake,) = await fakes(1, api_key="backend-secret")
    server = await lcha([fake], wait_healthy=False)
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.checked and bool(backend.last_error))
    assert backend.state == "unhealthy"
    assert "backends[].api_key" in backend.last_error


async def test_missing_capability_is_501(fakes, lcha, http):
    backends = await fakes(2)
    for fake in backends:
        fake.set_fault(
            routes=["/v1/embeddings"],
            status=501,
            body={"error": {"code": 501, "message": "no embeddings", "type": "not_supported_error"}},
        )
    server = await lcha(backends)
    for _ in range(2):
        status, body, _headers = await post(http, server, "/v1/embeddings", {"input": "hi"})
        assert status == 501
        error = error_of(body)
        assert error["code"] == "route_not_supported"
        assert "--embeddings" in error["message"]


async def test_unknown_model_while_starting_is_503(fakes, lcha, http):
    (fake,) = await fakes(1)
    fake.set_loading(True)
    server = await lcha([fake], wait_healthy=False)
    status, body, _headers = await post(
        http, server, "/v1/chat/completions", {**CHAT, "model": "tiny"}
    )
    assert status == 503
    assert error_of(body)["code"] == "no_backend"


async def test_deeply_nested_json_is_400(fakes, lcha, http):
    server = await lcha(await fakes(1))
    body = b"[" * 100_000 + b"]" * 100_000
    async with http.post(server.url + "/v1/chat/completions", data=body) as response:
        assert response.status == 400
        assert error_of(await response.read())["type"] == "invalid_request_error"


async def test_bad_gzip_body_is_400(fakes, lcha, http):
    server = await lcha(await fakes(1))
    async with http.post(
        server.url + "/v1/chat/completions",
        data=b"this is not gzip",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        assert error_of(await response.read())["type"] == "invalid_request_error"


async def test_backend_error_gets_openai_keys(fakes, lcha, http):
    (fake,) = await fakes(1)
    fake.set_fault(
        status=400,
        body={"error": {"code": 400, "message": "bad messages", "type": "invalid_request_error"}},
    )
    server = await lcha([fake])
    status, body, _headers = await post(http, server, "/v1/chat/completions", CHAT)
    assert status == 400
    error = error_of(body)
    assert error["message"] == "bad messages"
    assert error["param"] is None


async def test_native_completions_stream_is_clean(fakes, lcha, http):
    server = await lcha(await fakes(1))
    async with http.post(
        server.url + "/completions", json={"prompt": "hi", "n_predict": 3, "stream": True}
    ) as response:
        body = await read_stream(response)
    assert response.status == 200
    assert b"[DONE]" not in body
    assert b'"error"' not in body
