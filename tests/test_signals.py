"""Signals, drain, reload and sd_notify of a real `python -m lcha` process.

The backends are in-process fake llama-servers on loopback ports, so the
blocking process helpers run in a thread while the event loop serves them.
"""

import asyncio
import json
import signal
import socket
import time

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families


CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
# A stream of 10 tokens, 0.1 s apart: long enough to signal lcha mid-stream.
SLOW_STREAM = {**CHAT, "stream": True, "fake": {"event_delay": 0.1, "tokens": 10}}
# Twice as long, for tests that do several steps while the stream runs.
LONG_STREAM = {**CHAT, "stream": True, "fake": {"event_delay": 0.1, "tokens": 20}}
# A stream that stops after two events and never ends on its own.
HUNG_STREAM = {**CHAT, "stream": True, "fake": {"hang_after": 2}}
FAST_HEALTH = {"interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1}
EXIT_TIMEOUT = 10.0


def config_for(backends, **overrides):
    """Return an lcha config mapping for `backends`, a list of (name, fake) pairs."""
    data = {
        "backends": [{"name": name, "url": fake.url} for name, fake in backends],
        "health": FAST_HEALTH,
        "drain_timeout": "10s",
    }
    data.update(overrides)
    return data


async def wait_exit(server):
    return await asyncio.to_thread(server.process.wait, EXIT_TIMEOUT)


async def get_json(http, url):
    async with http.get(url) as response:
        return response.status, await response.json()


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within timeout")
        await asyncio.sleep(0.02)


async def read_all(response):
    """Read a response to its end and return the bytes and any payload error."""
    data = b""
    try:
        async for chunk in response.content.iter_any():
            data += chunk
    except aiohttp.ClientPayloadError as exc:
        return data, exc
    return data, None


def sse_events(data):
    return [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")]


def metric_samples(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


# --- drain -------------------------------------------------------------------------


async def test_drain_finishes_stream_and_queue(fakes, spawn, http):
    (fake,) = await fakes(1, slots=1)
    server = await spawn(config_for([("b0", fake)]))
    chat_url = server.url + "/v1/chat/completions"

    async with http.post(chat_url, json=LONG_STREAM) as stream:
        assert stream.status == 200
        await stream.content.readline()
        queued = asyncio.ensure_future(http.post(chat_url, json=CHAT))
        await wait_until(lambda: _queue_length(http, server, 1))

        server.send_signal(signal.SIGTERM)

        async def health_draining():
            status, summary = await get_json(http, server.url + "/health")
            return status == 503 and summary["status"] == "draining"

        await wait_until(health_draining)
        async with http.post(chat_url, json=CHAT) as refused:
            refused_body = await refused.json()
        assert refused.status == 503
        assert refused.headers["Connection"] == "close"
        assert refused_body["error"]["code"] == "draining"

        # A reload during the drain must not bring the process back into service.
        server.send_signal(signal.SIGHUP)
        body, error = await read_all(stream)
    assert error is None
    assert sse_events(body)[-1] == b"[DONE]"

    async with await queued as queued_response:
        queued_body = await queued_response.json()
    assert queued_response.status == 200
    assert queued_body["object"] == "chat.completion"
    assert await wait_exit(server) == 0
    log = server.log_path.read_text()
    assert "drain finished" in log
    assert "ended=0" in log
    assert "config reload ignored while draining" in log


async def _queue_length(http, server, expected):
    _status, summary = await get_json(http, server.url + "/health")
    return summary["queue"] == expected


async def test_drain_timeout_ends_stream_with_error(fakes, spawn, http):
    (fake,) = await fakes(1, slots=1)
    server = await spawn(config_for([("b0", fake)], drain_timeout="500ms"))
    chat_url = server.url + "/v1/chat/completions"

    async with http.post(chat_url, json=HUNG_STREAM) as stream:
        await stream.content.readline()
        queued = asyncio.ensure_future(http.post(chat_url, json=CHAT))
        await wait_until(lambda: _queue_length(http, server, 1))
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        body, error = await read_all(stream)
    ended_after = time.monotonic() - started

    events = sse_events(body)
    assert json.loads(events[-1])["error"]["code"] == "shutting_down"
    # lcha closes the connection without the final chunk, so the stream
    # cannot be mistaken for a complete one.
    assert error is not None
    assert ended_after >= 0.5
    async with await queued as queued_response:
        queued_body = await queued_response.json()
    assert queued_response.status == 503
    assert queued_body["error"]["code"] == "shutting_down"
    assert await wait_exit(server) == 0
    assert await fake.wait_until(lambda: fake.client_disconnects >= 1)
    assert "drain ending requests remaining=2 reason=drain_timeout" in server.log_path.read_text()


async def test_second_signal_ends_drain(fakes, spawn, http):
    (fake,) = await fakes(1)
    server = await spawn(config_for([("b0", fake)], drain_timeout="60s"))

    async with http.post(server.url + "/v1/chat/completions", json=HUNG_STREAM) as stream:
        await stream.content.readline()
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        await wait_until(lambda: _health_status(http, server, "draining"))
        server.send_signal(signal.SIGINT)
        body, _error = await read_all(stream)

    assert json.loads(sse_events(body)[-1])["error"]["code"] == "shutting_down"
    assert await wait_exit(server) == 0
    assert time.monotonic() - started < 10
    assert "reason=second_signal" in server.log_path.read_text()


async def _health_status(http, server, expected):
    _status, summary = await get_json(http, server.url + "/health")
    return summary["status"] == expected


# --- reload ------------------------------------------------------------------------


async def test_reload_invalid_config_kept(fakes, spawn, http):
    (fake,) = await fakes(1)
    server = await spawn(config_for([("b0", fake)]))
    server.config_path.write_text("backends: [{name: b0, url: 'htp://broken'}]\n")

    server.send_signal(signal.SIGHUP)

    async def failure_counted():
        async with http.get(server.url + "/metrics") as response:
            text = await response.text()
        return 'lcha_config_reloads_total{result="failure"} 1.0' in text

    await wait_until(failure_counted)
    async with http.post(server.url + "/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    log = server.log_path.read_text()
    assert "config reload failed, keeping the running configuration" in log
    assert "is not an http(s) URL" in log


async def test_reload_replaces_backends_mid_stream(fakes, spawn, http):
    (removed_fake,) = await fakes(1, slots=1, model="old-model")
    kept_fake, added_fake = await fakes(2, slots=1)
    config = config_for([("b0", removed_fake), ("b1", kept_fake)])
    server = await spawn(config)
    chat_url = server.url + "/v1/chat/completions"

    # Fill the metric families before the snapshot, errors included.
    async with http.post(chat_url, json=CHAT) as response:
        assert response.status == 200
    async with http.post(chat_url, json={**CHAT, "model": "nope"}) as response:
        assert response.status == 404

    async with http.post(chat_url, json={**LONG_STREAM, "model": "old-model"}) as stream:
        assert stream.headers["X-Lcha-Backend"] == "b0"
        await stream.content.readline()
        before = await _metrics(http, server)

        new_config = {
            **yaml.safe_load(server.config_path.read_text()),
            "backends": [
                {"name": "b1", "url": kept_fake.url, "slots": 3},
                {"name": "b2", "url": added_fake.url},
            ],
            "api_keys": ["sk-reload-test"],
            "queue": {"max_size": 0},
        }
        server.config_path.write_text(yaml.safe_dump(new_config))
        server.send_signal(signal.SIGHUP)
        await wait_until(lambda: _health_backends(http, server, ["b1", "b2"]))
        during = await _metrics(http, server)
        body, error = await read_all(stream)

    assert error is None
    assert sse_events(body)[-1] == b"[DONE]"
    assert during[("lcha_backend_state", (("backend", "b0"), ("state", "draining")))] == 1
    assert during[("lcha_config_reloads_total", (("result", "success"),))] == 1

    _status, summary = await get_json(http, server.url + "/health")
    slots = {entry["name"]: entry["slots"] for entry in summary["detail"]}
    assert slots["b1"] == 3
    async with http.post(chat_url, json=CHAT) as response:
        assert response.status == 401
    headers = {"Authorization": "Bearer sk-reload-test"}
    removed_requests = removed_fake.requests_by_route["/v1/chat/completions"]
    served_by = set()
    for _ in range(4):
        async with http.post(chat_url, json=CHAT, headers=headers) as response:
            assert response.status == 200
            served_by.add(response.headers["X-Lcha-Backend"])
    assert served_by <= {"b1", "b2"}
    assert removed_fake.requests_by_route["/v1/chat/completions"] == removed_requests

    after = await _metrics(http, server)
    assert after[("lcha_backend_state", (("backend", "b0"), ("state", "draining")))] == 0
    missing = [key for key in before if key not in after]
    assert missing == []
    decreased = [
        key
        for key, value in before.items()
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")) and after[key] < value
    ]
    assert decreased == []


async def test_reload_applies_queue_and_timeouts(fakes, spawn, http):
    (fake,) = await fakes(1, slots=1)
    server = await spawn(config_for([("b0", fake)]))
    written = yaml.safe_load(server.config_path.read_text())
    written.update(queue={"max_size": 0}, timeouts={"first_byte": "300ms"})
    server.config_path.write_text(yaml.safe_dump(written))
    server.send_signal(signal.SIGHUP)

    async def reloaded():
        async with http.get(server.url + "/metrics") as response:
            return 'lcha_config_reloads_total{result="success"} 1.0' in await response.text()

    await wait_until(reloaded)
    chat_url = server.url + "/v1/chat/completions"
    async with http.post(chat_url, json={**CHAT, "fake": {"headers_delay": 2}}) as late:
        late_body = await late.json()
    assert late.status == 504
    assert late_body["error"]["code"] == "upstream_timeout"

    async with http.post(chat_url, json=SLOW_STREAM) as stream:
        await stream.content.readline()
        async with http.post(chat_url, json=CHAT) as rejected:
            rejected_body = await rejected.json()
        await read_all(stream)
    assert rejected.status == 429
    assert rejected_body["error"]["code"] == "queue_full"


async def _metrics(http, server):
    async with http.get(server.url + "/metrics") as response:
        return metric_samples(await response.text())


async def _health_backends(http, server, names):
    _status, summary = await get_json(http, server.url + "/health")
    # A removed backend stays listed, as draining, until its requests end.
    serving = [entry["name"] for entry in summary["detail"] if entry["state"] != "draining"]
    return serving == names


# --- sd_notify ---------------------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def next(self, timeout=5.0):
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        message = data.decode()
        self.messages.append(message)
        return message

    async def wait_for(self, prefix, timeout=5.0):
        """Return the next message starting with `prefix`, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.next(max(deadline - time.monotonic(), 0.001))
            if message.startswith(prefix):
                return message

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _port_accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def test_notify_lifecycle(fakes, spawn, notify_socket):
    (fake,) = await fakes(1)
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"}
    server = await spawn(config_for([("b0", fake)]), env=env)

    # spawn() already saw /health 200, so READY=1 is waiting in the socket.
    ready = await notify_socket.wait_for("READY=1")
    assert ready == "READY=1"
    assert fake.requests_by_route["/health"] >= 1
    assert _port_accepts(server.port)
    status = await notify_socket.wait_for("STATUS=")
    assert "1/1 backends healthy" in status

    pings = 0
    started = time.monotonic()
    while pings < 3:
        if await notify_socket.next() == "WATCHDOG=1":
            pings += 1
    # WATCHDOG_USEC=200000 means a ping every 0.1 s. The limit leaves room
    # for a loaded machine and is still far below any default interval.
    assert time.monotonic() - started < 2.0

    server.send_signal(signal.SIGHUP)
    reloading = await notify_socket.wait_for("RELOADING=1")
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))
    monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < monotonic_usec - int(fields["MONOTONIC_USEC"]) < 5_000_000
    assert await notify_socket.wait_for("READY=1") == "READY=1"

    server.send_signal(signal.SIGTERM)
    assert await notify_socket.wait_for("STOPPING=1") == "STOPPING=1"
    assert await wait_exit(server) == 0
