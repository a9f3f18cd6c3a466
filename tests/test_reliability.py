"""Fault classes lcha must survive, each against fake llama-server backends.

lcha runs with the production runner (make_runner), so a client that goes
away cancels its handler as in the daemon. Every client call has a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import itertools
import json
import logging
import os
import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from helpers import BackgroundSampler, read_stream

CHAT_PATH = "/v1/chat/completions"
SLOW = pytest.mark.skipif(
    os.environ.get("LCHA_SLOW_TESTS") != "1", reason="set LCHA_SLOW_TESTS=1 to run"
)


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def sse_data(raw: bytes) -> list[str]:
    """Return the data fields of an SSE body, in order."""
    return [
        block.removeprefix("data: ")
        for block in raw.decode("utf-8", "replace").split("\n\n")
        if block.startswith("data: ")
    ]


def error_of(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


def stream_text(events: list[str]) -> str:
    text = ""
    for data in events:
        if data == "[DONE]":
            continue
        event = json.loads(data)
        for choice in event.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def post(
    client: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, bytes, Any]:
    async with client.post(url, json=body, **kwargs) as response:
        return response.status, await response.read(), response.headers


async def fetch(
    client: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, bytes, bool, Any]:
    """Like post, but a body cut short is returned with clean=False."""
    async with client.post(url, json=body, **kwargs) as response:
        raw, clean = await read_stream(response)
        return response.status, raw, clean, response.headers


@pytest.fixture
async def client():
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        yield session


class BusyMonitor(BackgroundSampler):
    """Samples every backend's lease count while a test runs."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        self.lowest = 0
        self.over_capacity: list[tuple[str, int, int]] = []

    async def _run(self) -> None:
        while True:
            for backend in self.server.state.registry:
                self.lowest = min(self.lowest, backend.inflight)
                if backend.available and backend.inflight > backend.capacity:
                    self.over_capacity.append((backend.name, backend.inflight, backend.capacity))
            await asyncio.sleep(0.002)


# --- 1. client gone ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "fault", "stage"),
    [
        # The fake sends stream headers before its prefill, and lcha sends
        # its own only with the first event.
        (True, {"prefill_cost": 1.0}, "prefill"),
        (False, {"event_delay": 0.1, "tokens": 200}, "prefill"),
    ],
    ids=["stream-prefill", "non-stream-generating"],
)
async def test_abort_closes_upstream(fakes, lcha, stream, fault, stage):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake])
    body = chat(stream=stream, fake=fault)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        task = asyncio.create_task(session.post(server.url + CHAT_PATH, json=body))
        assert await fake.wait_until(lambda: fake.processing == 1, timeout=5)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        closed_at = time.monotonic()

    assert await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=2)
    assert fake.last_disconnect_at - closed_at < 1.0
    await server.wait_for(lambda: server.state.registry.get("b0").inflight == 0, timeout=1)
    assert server.sample("lcha_client_aborts_total", route=CHAT_PATH, stage=stage) == 1
    assert server.sample("lcha_responses_total", route=CHAT_PATH, model="", status="499") == 1


async def test_abort_while_enqueuing(fakes, lcha, client):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake])
    condition = server.state.accounting.condition
    first = asyncio.create_task(
        post(client, server.url + CHAT_PATH, chat(fake={"event_delay": 0.05, "tokens": 6}))
    )
    assert await fake.wait_until(lambda: fake.processing == 1, timeout=5)

    # Holding the dispatcher's lock makes the second request wait inside the
    # enqueue step, where the client's disconnect then cancels it.
    await condition.acquire()
    try:
        async with aiohttp.ClientSession() as session:
            gone = asyncio.create_task(session.post(server.url + CHAT_PATH, json=chat()))
            await server.wait_for(lambda: len(server.state.dispatcher) == 1)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        await server.wait_for(
            lambda: server.sample(
                "lcha_client_aborts_total", route=CHAT_PATH, stage="queued"
            ) == 1
        )
    finally:
        condition.release()

    assert (await first)[0] == 200
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.inflight == 0 and len(server.state.dispatcher) == 0)
    await asyncio.sleep(0.1)
    assert backend.inflight == 0
    assert fake.requests_by_route[CHAT_PATH] == 1


# --- 2. lease bookkeeping under flaps ---------------------------------------------


@pytest.mark.parametrize(("before", "after"), [(2, 4), (4, 1)])
async def test_flap_restart_keeps_leases(fakes, lcha, client, caplog, before, after):
    flappy = (await fakes(1, slots=before))[0]
    steady = (await fakes(1, slots=2))[0]
    server = await lcha([flappy, steady], queue={"timeout": "20s"})
    registry = server.state.registry

    started = asyncio.Semaphore(0)

    async def long_stream(i: int) -> tuple[int, bool, str]:
        body = chat(f"long {i}", stream=True, fake={"event_delay": 0.05, "tokens": 60})
        async with client.post(server.url + CHAT_PATH, json=body) as response:
            await response.content.readuntil(b"\n\n")
            started.release()
            _raw, clean = await read_stream(response)
            return response.status, clean, response.headers["X-Lcha-Backend"]

    async with BusyMonitor(server) as monitor:
        # Fill every slot with streams under way, then queue four more requests.
        running = [asyncio.create_task(long_stream(i)) for i in range(before + 2)]
        for _ in running:
            await asyncio.wait_for(started.acquire(), 5)
        queued = [
            asyncio.create_task(
                fetch(client, server.url + CHAT_PATH, chat(f"queued {i}", fake={"event_delay": 0.05, "tokens": 4}))
            )
            for i in range(4)
        ]
        await server.wait_for(lambda: len(server.state.dispatcher) == 4)

        # A restart on the same port while streams run on it.
        await flappy.stop()
        await flappy.start(slots=after)
        streams = await asyncio.gather(*running)
        results = await asyncio.gather(*queued)
        await server.wait_for(
            lambda: registry.get("b0").available and registry.get("b0").capacity == after
        )

        # Equal requests in a burst: the restarted backend takes its share.
        short = {"event_delay": 0.02, "tokens": 5}
        burst = await asyncio.gather(
            *(post(client, server.url + CHAT_PATH, chat(f"burst {i}", fake=short)) for i in range(12))
        )

    assert sorted(streams) == sorted([(200, False, "b0")] * before + [(200, True, "b1")] * 2)
    assert [(status, clean) for status, _raw, clean, _headers in results] == [(200, True)] * 4
    assert [status for status, _body, _headers in burst] == [200] * 12
    served_by = [headers["X-Lcha-Backend"] for _status, _body, headers in burst]
    assert served_by.count("b0") >= 12 * after // (after + 2) - 2
    assert monitor.lowest == 0
    assert monitor.over_capacity == []
    assert [b.inflight for b in registry] == [0, 0]
    assert "slot count below zero" not in caplog.text
    for fake in (flappy, steady):
        assert fake.deferred_total == 0
        assert fake.max_concurrent <= max(before, after, 2)


# --- 3. streams are not buffered ---------------------------------------------------


async def test_stream_events_unbuffered(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    body = chat(stream=True, fake={"event_delay": 0.25, "tokens": 4})
    arrivals: list[float] = []
    raw = b""
    async with client.post(
        server.url + CHAT_PATH, json=body, headers={"Accept-Encoding": "gzip, deflate, br"}
    ) as response:
        headers = response.headers
        async for chunk in response.content.iter_any():
            raw += chunk
            arrivals.extend([time.monotonic()] * chunk.count(b"\n\n"))

    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in headers
    assert raw.startswith(b"data: ")
    assert sse_data(raw)[-1] == "[DONE]"
    # The backend sends token events 250 ms apart, and a buffering relay
    # would deliver them together.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap > 0.15) >= 3


async def test_gzip_client_gets_plain_json(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    status, raw, headers = await post(
        client, server.url + CHAT_PATH, chat(), headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200
    assert "Content-Encoding" not in headers
    assert json.loads(raw)["object"] == "chat.completion"
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(raw)


# --- 4. long generations -------------------------------------------------------------


async def test_idle_backend_cut(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake], timeouts={"idle": "500ms"})
    started = time.monotonic()
    async with client.post(
        server.url + CHAT_PATH, json=chat(stream=True, max_tokens=10, fake={"hang_after": 3})
    ) as response:
        raw, clean = await read_stream(response)

    assert response.status == 200
    assert time.monotonic() - started < 3.0
    assert clean is False
    events = sse_data(raw)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert "timeouts.idle" in error["message"]
    assert server.sample("lcha_upstream_errors_total", backend="b0", kind="idle_timeout") == 1
    assert await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=1)
    await server.wait_for(lambda: server.state.registry.get("b0").inflight == 0, timeout=1)


async def test_pings_keep_stream_alive(fakes, lcha, client):
    # llama-server sends ":" comments during long silences, and they count as traffic.
    (fake,) = await fakes(1, sse_ping_interval=0.15)
    server = await lcha([fake], timeouts={"idle": "400ms"})
    async with client.post(
        server.url + CHAT_PATH, json=chat(stream=True, fake={"event_delay": 0.7, "tokens": 2})
    ) as response:
        raw, clean = await read_stream(response)
    assert clean is True
    assert sse_data(raw)[-1] == "[DONE]"
    assert server.sample("lcha_upstream_errors_total", backend="b0", kind="idle_timeout") == 0


@SLOW
@pytest.mark.slow
async def test_seven_minute_stream(fakes, lcha):
    (fake,) = await fakes(1)
    # Default timeouts: first_byte 600 s, idle 120 s, no total limit.
    server = await lcha([fake])
    body = chat(stream=True, fake={"event_delay": 1.0, "tokens": 420})
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        async with session.post(server.url + CHAT_PATH, json=body) as response:
            raw, clean = await read_stream(response)
    assert time.monotonic() - started > 420
    assert clean is True
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert len(stream_text(events)) == 420 * 4


@SLOW
@pytest.mark.slow
async def test_six_minute_non_stream(fakes, lcha):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    body = chat(fake={"token_time": 1.0, "tokens": 360})
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        status, raw, _headers = await post(session, server.url + CHAT_PATH, body)
    assert time.monotonic() - started > 360
    assert status == 200
    assert len(json.loads(raw)["choices"][0]["message"]["content"]) == 360 * 4


# --- 5. truncation never looks like success -------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "fault", "kind"),
    [
        (CHAT_PATH, chat(max_tokens=10), {"reset_after": 3}, "reset"),
        (CHAT_PATH, chat(max_tokens=10), {"close_after": 3}, "reset"),
        ("/completion", {"prompt": "hi", "n_predict": 10}, {"reset_after": 3}, "reset"),
        ("/completion", {"prompt": "hi", "n_predict": 10}, {"close_after": 3}, "reset"),
        (CHAT_PATH, chat(max_tokens=10), {"error_after": 3}, "truncated"),
    ],
    ids=["chat-reset", "chat-fin", "native-reset", "native-fin", "chat-error-event"],
)
async def test_cut_stream_is_error(fakes, lcha, client, path, body, fault, kind):
    broken, other = await fakes(2)
    broken.set_fault(**fault)
    server = await lcha([broken, other], routing={"policy": "round_robin"})
    async with client.post(server.url + path, json={**body, "stream": True}) as response:
        raw, clean = await read_stream(response)

    assert response.status == 200
    assert response.headers["X-Lcha-Backend"] == "b0"
    assert clean is False
    events = sse_data(raw)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_stream_failed"
    assert server.sample("lcha_upstream_errors_total", backend="b0", kind=kind) == 1
    assert other.requests_by_route[path] == 0


@pytest.mark.parametrize(
    "fault", [{"reset_after": 0}, {"close_after": 0}, {"truncate": True}], ids=["reset", "fin", "short"]
)
async def test_cut_non_stream_is_502(fakes, lcha, client, fault):
    (fake,) = await fakes(1)
    fake.set_fault(**fault)
    server = await lcha([fake])
    status, raw, _headers = await post(client, server.url + CHAT_PATH, chat())
    assert status == 502
    assert error_of(raw)["code"] == "upstream_truncated"
    assert server.sample("lcha_upstream_errors_total", backend="b0", kind="truncated") == 1


# --- 6. usage chunks ----------------------------------------------------------------


async def test_usage_chunk_untouched(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    async with client.post(server.url + CHAT_PATH, json=body) as response:
        raw, clean = await read_stream(response)

    assert clean is True
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    usage_event = json.loads(events[-2])
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 3
    # Byte for byte as the fake rendered it: compact JSON, key order kept.
    assert events[-2] == json.dumps(usage_event, ensure_ascii=False, separators=(",", ":"))


async def test_token_counters_match_backend(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake])
    requests = [
        (CHAT_PATH, chat("a shared long prefix " * 8, stream=True, stream_options={"include_usage": True})),
        (CHAT_PATH, chat("a shared long prefix " * 8, stream=True)),
        (CHAT_PATH, chat("a shared long prefix " * 8)),
        ("/v1/completions", {"prompt": "once upon a time " * 6, "max_tokens": 5, "stream": True}),
        ("/v1/completions", {"prompt": "once upon a time " * 6, "max_tokens": 5}),
        ("/completion", {"prompt": "native prompt " * 5, "n_predict": 3, "stream": True}),
    ]
    for path, body in requests:
        async with client.post(server.url + path, json=body) as response:
            assert response.status == 200
            await response.read()

    prompt = server.sample("lcha_prompt_tokens_total", backend="b0", model="")
    cached = server.sample("lcha_prompt_tokens_cached_total", backend="b0", model="")
    completion = server.sample("lcha_completion_tokens_total", backend="b0", model="")
    assert fake.cached_tokens_total > 0
    assert prompt == fake.prompt_tokens_total + fake.cached_tokens_total
    assert cached == fake.cached_tokens_total
    assert completion == fake.predicted_tokens_total


# --- 7. error shapes and the openai client --------------------------------------------


def openai_client(server, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=20
    )


async def fill_queue(fake, server, client, tasks: list[asyncio.Task[Any]]) -> None:
    """Take the only slot and the only queue place of a one-slot, max_size 1 setup."""
    body = chat(fake={"event_delay": 0.05, "tokens": 20})
    headers = {"Authorization": "Bearer sk-test"}
    tasks.append(asyncio.create_task(post(client, server.url + CHAT_PATH, body, headers=headers)))
    await server.wait_for(lambda: fake.processing == 1)
    tasks.append(asyncio.create_task(post(client, server.url + CHAT_PATH, body, headers=headers)))
    await server.wait_for(lambda: len(server.state.dispatcher) == 1)


async def test_openai_client_error_classes(fakes, lcha, client):
    (fake,) = await fakes(1, slots=1, model="tiny")
    server = await lcha([fake], api_keys=["sk-test"], queue={"max_size": 1})
    oai = openai_client(server)
    messages = [{"role": "user", "content": "hi"}]

    with pytest.raises(openai.NotFoundError) as caught:
        await oai.chat.completions.create(model="nope", messages=messages)
    assert caught.value.code == "model_not_found"
    assert "'nope' does not exist" in caught.value.message

    with pytest.raises(openai.AuthenticationError) as caught:
        await openai_client(server, "sk-wrong").chat.completions.create(model="tiny", messages=messages)
    assert caught.value.code == "invalid_api_key"
    assert "Invalid API key" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="tiny", messages=messages, extra_body={"model": 7})
    assert caught.value.param == "model"
    assert "'model' must be a string" in caught.value.message

    tasks: list[asyncio.Task[Any]] = []
    await fill_queue(fake, server, client, tasks)
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(model="tiny", messages=messages)
    assert caught.value.code == "queue_full"
    assert "queue is full" in caught.value.message
    await asyncio.gather(*tasks)

    fake.add_fault(truncate=True)
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="tiny", messages=messages)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_truncated"

    # The truncation took b0 out of rotation until its next health check.
    # Let that check land first, or it could bring b0 back after the stop.
    await server.wait_for(lambda: server.state.registry.get("b0").available)
    await fake.stop()
    await server.wait_for(lambda: not server.state.registry.get("b0").available)
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(model="tiny", messages=messages)
    assert caught.value.status_code == 503
    assert caught.value.code == "no_backend"
    await oai.close()


async def test_openai_client_stream_error(fakes, lcha):
    (fake,) = await fakes(1, model="tiny")
    fake.set_fault(reset_after=3)
    server = await lcha([fake])
    oai = openai_client(server)
    stream = await oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=10
    )
    pieces = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            pieces.append(chunk)
    await oai.close()
    assert pieces
    assert "connection lost mid-stream" in caught.value.message
    assert caught.value.code == "upstream_stream_failed"


@pytest.mark.parametrize(
    ("setup", "status", "code"),
    [
        ("bad_json", 400, None),
        ("wrong_key", 401, "invalid_api_key"),
        ("unknown_model", 404, "model_not_found"),
        ("slow_body", 408, "request_timeout"),
        ("too_large", 413, "request_too_large"),
        ("queue_full", 429, "queue_full"),
        ("truncated", 502, "upstream_truncated"),
        ("all_failed", 502, "upstream_error"),
        ("queue_timeout", 503, "queue_timeout"),
        ("no_backend", 503, "no_backend"),
        ("first_byte", 504, "upstream_timeout"),
    ],
)
async def test_error_shape(fakes, lcha, client, setup, status, code):
    (fake,) = await fakes(1, slots=1)
    server = await lcha(
        [fake],
        api_keys=["sk-test"],
        queue={"max_size": 1, "timeout": "300ms"},
        timeouts={"client_read": "300ms", "first_byte": "300ms" if setup == "first_byte" else "10s"},
        max_body_size="64KiB",
    )
    url = server.url + CHAT_PATH
    auth = {"Authorization": "Bearer sk-test"}
    tasks: list[asyncio.Task[Any]] = []
    kwargs: dict[str, Any] = {"json": chat(), "headers": auth}
    if setup == "bad_json":
        kwargs = {"data": b"{", "headers": {**auth, "Content-Type": "application/json"}}
    elif setup == "wrong_key":
        kwargs["headers"] = {"Authorization": "Bearer nope"}
    elif setup == "unknown_model":
        kwargs["json"] = chat(model="nope")
    elif setup == "slow_body":
        kwargs = {"data": slow_body(), "headers": {**auth, "Content-Length": "100"}}
    elif setup == "too_large":
        kwargs["json"] = chat("x" * 70000)
    elif setup == "queue_full":
        await fill_queue(fake, server, client, tasks)
    elif setup == "truncated":
        fake.add_fault(truncate=True)
    elif setup == "all_failed":
        fake.set_fault(reset=True)
    elif setup == "queue_timeout":
        tasks.append(asyncio.create_task(post(client, url, chat(fake={"headers_delay": 1.0}), headers=auth)))
        await server.wait_for(lambda: fake.processing == 1)
    elif setup == "no_backend":
        await fake.stop()
        await server.wait_for(lambda: not server.state.registry.get("b0").available)
    elif setup == "first_byte":
        kwargs["json"] = chat(fake={"headers_delay": 5})

    async with client.post(url, **kwargs) as response:
        raw = await response.read()
        assert response.status == status
        assert response.content_type == "application/json"
    error = error_of(raw)
    assert error["message"]
    assert error["code"] == code
    await asyncio.gather(*tasks)


async def slow_body():
    yield b'{"messages": '
    await asyncio.sleep(5)
    yield b"[]}"


# --- 8. the model field ----------------------------------------------------------------

ODD_NAME = "org/name:Q4_K_M"


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("absent", 200, None),
        (None, 200, None),
        (ODD_NAME, 200, None),
        (7, 400, None),
        (["tiny"], 400, None),
        ({"name": ODD_NAME}, 400, None),
        ("org/name:q4_k_m", 404, "model_not_found"),
        (ODD_NAME + " ", 404, "model_not_found"),
        ("", 404, "model_not_found"),
        ("x" * 10000, 404, "model_not_found"),
    ],
    ids=[
        "absent", "null", "odd-name", "number", "list", "object",
        "other-case", "trailing-space", "empty", "huge",
    ],
)
async def test_model_field(fakes, lcha, client, model, status, code):
    (fake,) = await fakes(1)
    server = await lcha([fake], backend_options={"models": [ODD_NAME]})
    body = chat()
    if model != "absent":
        body["model"] = model
    got, raw, _headers = await post(client, server.url + CHAT_PATH, body)
    assert got == status
    if status == 200:
        assert fake.requests_by_route[CHAT_PATH] == 1
        return
    error = error_of(raw)
    assert error["code"] == code
    assert len(error["message"]) < 2000
    assert fake.requests_by_route[CHAT_PATH] == 0


async def test_models_lists_routable(fakes, lcha, client):
    alpha, beta = await fakes(2)
    server = await lcha([alpha, beta])
    config = server.state.config
    first, second = config.backends
    server.state.reload(
        config.replace(
            backends=(
                dataclasses.replace(first, models=(ODD_NAME,)),
                dataclasses.replace(second, models=("beta",)),
            )
        )
    )
    await beta.stop()
    await server.wait_for(lambda: not server.state.registry.get("b1").available)

    async with client.get(server.url + "/v1/models") as response:
        listed = [entry["id"] for entry in (await response.json())["data"]]
    assert listed == [ODD_NAME]
    for model in listed:
        status, _raw, _headers = await post(client, server.url + CHAT_PATH, chat(model=model))
        assert status == 200
    status, raw, _headers = await post(client, server.url + CHAT_PATH, chat(model="beta"))
    assert status == 503
    assert error_of(raw)["code"] == "no_backend"


# --- 9. credentials -------------------------------------------------------------------


class RecordingBackend:
    """A minimal llama-server that records the headers of every request."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        # The health poller sends no request id; forwarded requests carry one.
        if "X-Request-Id" in request.headers:
            self.headers.append(dict(request.headers))
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        if request.path == "/props":
            return web.json_response({"total_slots": 2})
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "rec", "object": "model"}]})
        if request.path == "/slots":
            return web.json_response([{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}])
        if request.path == CHAT_PATH:
            return web.json_response(
                {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}]}
            )
        return web.json_response({"tokens": [1, 2]})


@pytest.fixture
async def recording():
    backend = RecordingBackend()
    await backend.start()
    yield backend
    await backend.stop()


SECRETS = {
    "Authorization": "Bearer sk-client-secret-1",
    "X-Api-Key": "sk-client-secret-2",
    "Cookie": "session=cookie-secret-3",
    "Proxy-Authorization": "Basic proxy-secret-4",
}


@pytest.mark.parametrize("backend_key", [None, "backend-key"])
async def test_credentials_stay_with_lcha(lcha, client, recording, caplog, backend_key):
    caplog.set_level(logging.DEBUG)
    server = await lcha(
        [recording],
        api_keys=["sk-client-secret-1", "sk-client-secret-2"],
        backend_options={"api_key": backend_key} if backend_key else None,
    )
    for path, method, body in [
        (CHAT_PATH, "POST", chat()),
        (CHAT_PATH, "POST", chat(model="missing")),
        ("/tokenize", "POST", {"content": "hi"}),
        ("/props", "GET", None),
    ]:
        # Once with the key in Authorization, once in X-Api-Key.
        for left_out in ("X-Api-Key", "Authorization"):
            headers = {name: value for name, value in SECRETS.items() if name != left_out}
            async with client.request(method, server.url + path, json=body, headers=headers) as response:
                await response.read()
                assert response.status in (200, 404)

    assert len(recording.headers) == 6
    for headers in recording.headers:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert "x-api-key" not in lowered
        assert "cookie" not in lowered
        assert "proxy-authorization" not in lowered
        if backend_key:
            assert lowered["authorization"] == f"Bearer {backend_key}"
        else:
            assert "authorization" not in lowered
    for secret in ("sk-client-secret-1", "sk-client-secret-2", "cookie-secret-3", "proxy-secret-4"):
        assert secret not in caplog.text


async def test_wrong_key_skips_full_queue(fakes, lcha, client):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake], api_keys=["sk-test"], queue={"max_size": 1})
    auth = {"Authorization": "Bearer sk-test"}
    first = asyncio.create_task(
        post(client, server.url + CHAT_PATH, chat(fake={"headers_delay": 0.5}), headers=auth)
    )
    await server.wait_for(lambda: fake.processing == 1)
    second = asyncio.create_task(post(client, server.url + CHAT_PATH, chat(), headers=auth))
    await server.wait_for(lambda: len(server.state.dispatcher) == 1)

    status, raw, _headers = await post(
        client, server.url + CHAT_PATH, chat(), headers={"Authorization": "Bearer sk-nope"}
    )
    assert status == 401
    assert error_of(raw)["type"] == "authentication_error"
    assert server.sample("lcha_rejections_total", reason="queue_full") == 0
    assert len(server.state.dispatcher) == 1
    assert [(await task)[0] for task in (first, second)] == [200, 200]
    assert fake.requests_by_route[CHAT_PATH] == 2


# --- 10. saturation ------------------------------------------------------------------


class ProbeLatency(BackgroundSampler):
    """Times /health, /metrics and /v1/models in a loop while a test runs."""

    def __init__(self, server, client) -> None:
        super().__init__()
        self.server = server
        self.client = client
        self.worst = 0.0
        self.count = 0
        self.failures: list[tuple[str, int]] = []

    async def _run(self) -> None:
        while True:
            for path in ("/health", "/metrics", "/v1/models"):
                started = time.monotonic()
                async with self.client.get(self.server.url + path) as response:
                    await response.read()
                    if response.status != 200:
                        self.failures.append((path, response.status))
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
            await asyncio.sleep(0.05)


async def test_saturation_fifo_and_429(fakes, lcha, client):
    backends = await fakes(2, slots=2)
    server = await lcha(backends, queue={"max_size": 4})
    first_event: dict[int, float] = {}

    async def stream(i: int) -> tuple[int, float]:
        sent = time.monotonic()
        # Each stream takes about 3 s. The first four end 300 ms apart, so
        # slots free up one at a time and the FIFO order shows in start times.
        tokens = 30 + 3 * i if i < 4 else 30
        body = chat(f"request {i}", stream=True, fake={"event_delay": 0.1, "tokens": tokens})
        async with client.post(server.url + CHAT_PATH, json=body) as response:
            if response.status != 200:
                await response.read()
                return response.status, time.monotonic() - sent
            await response.content.readuntil(b"\n\n")
            first_event[i] = time.monotonic()
            _raw, clean = await read_stream(response)
            assert clean
            return 200, time.monotonic() - sent

    async with ProbeLatency(server, client) as probe:
        tasks = []
        # One at a time, so the arrival order is known.
        for i in range(10):
            tasks.append(asyncio.create_task(stream(i)))
            if i < 4:
                await server.wait_for(lambda i=i: sum(b.processing for b in backends) == i + 1)
            elif i < 8:
                await server.wait_for(lambda i=i: len(server.state.dispatcher) == i - 3)
        results = await asyncio.gather(*tasks)

    assert [status for status, _elapsed in results] == [200] * 8 + [429] * 2
    assert all(elapsed < 0.5 for _status, elapsed in results[8:])
    waiting = sorted(range(4, 8), key=lambda i: first_event[i])
    assert waiting == [4, 5, 6, 7]
    assert min(first_event[i] for i in range(4, 8)) > max(first_event[i] for i in range(4))
    assert probe.count > 10
    assert probe.failures == []
    assert probe.worst < 0.5
    for fake in backends:
        assert fake.max_concurrent <= 2
        assert fake.deferred_total == 0


async def test_saturation_queue_timeout(fakes, lcha, client):
    backends = await fakes(2, slots=2)
    server = await lcha(backends, queue={"max_size": 4, "timeout": "1s"})
    long_stream = {"event_delay": 0.1, "tokens": 25}

    async def stream(i: int) -> tuple[int, float, bytes]:
        sent = time.monotonic()
        body = chat(f"request {i}", stream=True, fake=long_stream)
        async with client.post(server.url + CHAT_PATH, json=body) as response:
            raw = await response.read()
            return response.status, time.monotonic() - sent, raw

    async with ProbeLatency(server, client) as probe:
        results = await asyncio.gather(*(stream(i) for i in range(8)))

    timed_out = [(elapsed, raw) for status, elapsed, raw in results if status == 503]
    assert sorted(status for status, _elapsed, _raw in results) == [200] * 4 + [503] * 4
    for elapsed, raw in timed_out:
        assert 0.9 < elapsed < 2.0
        assert error_of(raw)["code"] == "queue_timeout"
    assert probe.failures == []
    assert probe.worst < 0.5
    assert server.sample("lcha_rejections_total", reason="queue_timeout") == 4


# --- 11. loading backends ------------------------------------------------------------


async def test_loading_backend_joins_after_rise(fakes, lcha, client):
    loading, ready = await fakes(2)
    loading.set_loading(True)
    server = await lcha(
        [loading, ready], wait_healthy=False, health={"interval": "100ms", "rise": 3}
    )
    registry = server.state.registry
    await server.wait_for(lambda: registry.get("b1").available and registry.get("b0").state == "loading")

    async with client.get(server.url + "/health") as response:
        detail = {entry["name"]: entry["state"] for entry in (await response.json())["detail"]}
    assert detail == {"b0": "loading", "b1": "healthy"}
    async with client.get(server.url + "/metrics") as response:
        assert 'lcha_backend_state{backend="b0",state="loading"} 1.0' in await response.text()
    for i in range(4):
        _status, _raw, headers = await post(client, server.url + CHAT_PATH, chat(f"while loading {i}"))
        assert headers["X-Lcha-Backend"] == "b1"

    loading.set_loading(False)
    ready_at = time.monotonic()
    await server.wait_for(lambda: registry.get("b0").available, timeout=3)
    # With rise=3 and polls 100 ms apart, the first success alone must not admit it.
    assert time.monotonic() - ready_at > 0.15
    assert loading.requests_by_route[CHAT_PATH] == 0


async def test_loading_answer_reroutes(fakes, lcha, client):
    flaky, good = await fakes(2)
    server = await lcha([flaky, good], routing={"policy": "round_robin"}, health={"interval": "5s"})
    flaky.set_loading(0.5)
    for i in range(3):
        status, _raw, headers = await post(client, server.url + CHAT_PATH, chat(f"n{i}"))
        assert status == 200
        assert headers["X-Lcha-Backend"] == "b1"
    assert server.state.registry.get("b0").state == "loading"
    assert flaky.requests_by_route[CHAT_PATH] == 1


# --- 12. retry only when safe ----------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        (False, {"reset": True}),
        (True, {"reset": True}),
        (True, {"status": 503, "body": {"error": {"code": 503, "message": "busy"}}}),
        # Headers sent, then a reset before the first event: nothing reached the client.
        (True, {"reset_after": 0}),
    ],
    ids=["reset", "stream-reset", "stream-503", "stream-reset-before-event"],
)
async def test_retry_before_first_byte(fakes, lcha, client, stream, fault):
    broken, good = await fakes(2)
    # Every request fails: a one-off reset is absorbed by resending on a
    # fresh connection to the same backend (see the stale-connection test).
    broken.set_fault(**fault)
    server = await lcha([broken, good], routing={"policy": "round_robin"})
    async with client.post(
        server.url + CHAT_PATH, json=chat(stream=stream, max_tokens=5)
    ) as response:
        raw, clean = await read_stream(response)

    assert response.status == 200
    assert clean is True
    assert response.headers["X-Lcha-Backend"] == "b1"
    if stream:
        events = sse_data(raw)
        assert events[-1] == "[DONE]"
        assert stream_text(events) == " The fox ran far and"
    assert server.sample("lcha_retries_total", backend="b0") == 1


async def test_no_retry_after_events(fakes, lcha, client):
    broken, good = await fakes(2)
    broken.add_fault(reset_after=2)
    server = await lcha([broken, good], routing={"policy": "round_robin"})
    async with client.post(
        server.url + CHAT_PATH, json=chat(stream=True, max_tokens=8)
    ) as response:
        raw, clean = await read_stream(response)

    events = sse_data(raw)
    assert clean is False
    # The role event and the first token, once each, then lcha's error event.
    assert len(events) == 3
    assert stream_text(events[:-1]) == " The"
    assert "error" in json.loads(events[-1])
    assert good.requests_by_route[CHAT_PATH] == 0
    assert server.sample("lcha_retries_total", backend="b0") == 0


async def test_all_backends_fail_is_502(fakes, lcha, client):
    backends = await fakes(2)
    for fake in backends:
        fake.set_fault(reset=True)
    server = await lcha(backends)
    status, raw, _headers = await post(client, server.url + CHAT_PATH, chat())
    assert status == 502
    assert error_of(raw)["code"] == "upstream_error"
    # Each backend gets the request twice: once more on a fresh connection,
    # then lcha's one retry moves it to the other backend.
    assert [fake.requests_by_route[CHAT_PATH] for fake in backends] == [2, 2]


# --- 13. big inputs ---------------------------------------------------------------------


async def test_30mib_request_forwarded(fakes, lcha, client):
    (fake,) = await fakes(1, n_ctx=16_000_000)
    server = await lcha([fake])
    text = "abcd" * (30 * 1024 * 1024 // 4)
    status, raw, _headers = await post(client, server.url + CHAT_PATH, chat(text, max_tokens=1))
    assert status == 200
    assert json.loads(raw)["usage"]["prompt_tokens"] > 30 * 1024 * 1024 // 4


@pytest.mark.parametrize("chunked", [False, True])
async def test_over_limit_is_413(fakes, lcha, client, chunked):
    (fake,) = await fakes(1)
    server = await lcha([fake], max_body_size="1MiB")
    body = json.dumps(chat("x" * (2 * 1024 * 1024))).encode()

    async def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    data = chunks() if chunked else body
    async with client.post(
        server.url + CHAT_PATH, data=data, headers={"Content-Type": "application/json"}
    ) as response:
        raw = await response.read()
    assert response.status == 413
    assert error_of(raw)["code"] == "request_too_large"
    assert fake.requests_by_route[CHAT_PATH] == 0
    assert server.sample("lcha_rejections_total", reason="too_large") == 1


# --- 14. slow clients -------------------------------------------------------------------


async def open_raw(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _sep, port = server.url.removeprefix("http://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def test_slow_headers_cut(fakes, lcha):
    (fake,) = await fakes(1)
    server = await lcha([fake], timeouts={"client_read": "500ms"})
    reader, writer = await open_raw(server)
    started = time.monotonic()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lcha\r\nContent-Type: application/json\r\n"
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                raise ConnectionResetError("closed by lcha")
    assert time.monotonic() - started < 2.0
    writer.close()
    assert fake.requests_by_route[CHAT_PATH] == 0


async def test_stalled_headers_get_408(fakes, lcha):
    (fake,) = await fakes(1)
    server = await lcha([fake], timeouts={"client_read": "300ms"})
    reader, writer = await open_raw(server)
    started = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lc")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert time.monotonic() - started < 1.5
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"
    assert server.sample("lcha_rejections_total", reason="bad_request") == 1


async def test_stalled_body_gets_408(fakes, lcha):
    (fake,) = await fakes(1, slots=1)
    server = await lcha([fake], timeouts={"client_read": "300ms"})
    reader, writer = await open_raw(server)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lcha\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"messages\": "
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert server.state.registry.get("b0").inflight == 0
    assert fake.requests_by_route[CHAT_PATH] == 0


async def test_idle_keepalive_not_cut(fakes, lcha):
    (fake,) = await fakes(1)
    server = await lcha([fake], timeouts={"client_read": "200ms"})
    reader, writer = await open_raw(server)
    body = json.dumps(chat()).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lcha\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    for _ in range(2):
        # Headers and body in small pieces, each within the limit.
        for start in range(0, len(request), 40):
            writer.write(request[start : start + 40])
            await asyncio.sleep(0.01)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        # Idle longer than client_read between requests: keepalive_timeout applies.
        await asyncio.sleep(0.5)
    assert not reader.at_eof()
    writer.close()


# --- metrics -----------------------------------------------------------------------------


def requests_and_responses(server) -> tuple[dict[str, float], dict[str, float]]:
    requests: dict[str, float] = {}
    responses: dict[str, float] = {}
    for family in server.state.metrics.registry.collect():
        for sample in family.samples:
            route = sample.labels.get("route")
            if sample.name == "lcha_requests_total":
                requests[route] = requests.get(route, 0) + sample.value
            elif sample.name == "lcha_responses_total":
                responses[route] = responses.get(route, 0) + sample.value
    return requests, responses


async def test_metrics_add_up(fakes, lcha, client):
    (fake,) = await fakes(1)
    server = await lcha([fake], max_body_size="1KiB")
    calls = [
        ("POST", CHAT_PATH, b'{"messages": []'),
        ("POST", CHAT_PATH, b"[]"),
        ("POST", CHAT_PATH, json.dumps(chat("x" * 2000)).encode()),
        ("POST", CHAT_PATH, json.dumps(chat(model="nope")).encode()),
        ("POST", CHAT_PATH, json.dumps(chat()).encode()),
        ("POST", "/tokenize", b"{"),
        ("POST", "/tokenize", json.dumps({"content": "hi"}).encode()),
        ("GET", "/props", b""),
        ("GET", "/no/such/path", b""),
    ]
    for method, path, data in calls:
        async with client.request(
            method, server.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as response:
            await response.read()

    requests, responses = requests_and_responses(server)
    assert requests == responses
    assert sum(responses.values()) == len(calls)


async def test_abort_on_model_route(fakes, lcha):
    (fake,) = await fakes(1)
    fake.set_fault(routes=["/tokenize"], hang=True)
    server = await lcha([fake])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        task = asyncio.create_task(session.post(server.url + "/tokenize", json={"content": "hi"}))
        assert await fake.wait_until(lambda: fake.requests_by_route["/tokenize"] == 1, timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert await fake.wait_until(lambda: fake.client_disconnects == 1, timeout=2)
    await server.wait_for(
        lambda: server.sample("lcha_responses_total", route="/tokenize", model="", status="499") == 1
    )
    assert server.sample("lcha_responses_total", route="/tokenize", model="", status="500") == 0


async def test_rejected_body_keeps_connection(fakes, lcha):
    # A 401 leaves the body unread; aiohttp reads it after the response, and
    # those bytes must not start a header timer on the kept-alive connection.
    (fake,) = await fakes(1)
    server = await lcha([fake], api_keys=["sk-test"], timeouts={"client_read": "300ms"})
    reader, writer = await open_raw(server)
    body = json.dumps(chat("y" * 400_000)).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lcha\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-nope\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)
    for start in range(0, len(body), 65536):
        writer.write(body[start : start + 65536])
        await writer.drain()
    await asyncio.sleep(0.6)

    small = json.dumps(chat()).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lcha\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-test\r\nContent-Length: " + str(len(small)).encode() + b"\r\n\r\n"
        + small
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")


async def test_stale_connection_resent_same_backend(fakes, lcha, client):
    broken, good = await fakes(2)
    broken.add_fault(reset=True)
    server = await lcha([broken, good], routing={"policy": "round_robin"})
    async with client.post(server.url + CHAT_PATH, json=chat(max_tokens=5)) as response:
        await response.read()
    assert response.status == 200
    assert response.headers["X-Lcha-Backend"] == "b0"
    assert server.sample("lcha_retries_total", backend="b0") == 0
