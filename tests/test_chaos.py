"""Randomized faults over fake backends: thousands of requests, bounded in time.

Clients abort at random, backends stop and restart on the same port (some with
another slot count or a loading phase), backends inject faults per request, and
some requests are malformed. Afterwards every lease is back, the queue is empty,
no backend was sent more requests than it has slots, no request hung, and the
request and response counters agree.

The seed comes from LCHA_CHAOS_SEED (default: random, printed on failure).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
from typing import Any

import aiohttp
import pytest

from helpers import read_stream

pytestmark = pytest.mark.chaos

REQUESTS = int(os.environ.get("LCHA_CHAOS_REQUESTS", "3000"))
CONCURRENCY = 48
# Generation and restarts stop after this many seconds even if requests remain.
TIME_BUDGET = 120.0
CLIENT_TIMEOUT = 10.0
BACKENDS = 3
API_KEY = "sk-chaos"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

CHAT_PATH = "/v1/chat/completions"


def sse_data(raw: bytes) -> list[str]:
    return [
        block.removeprefix("data: ")
        for block in raw.decode("utf-8", "replace").split("\n\n")
        if block.startswith("data: ")
    ]


class Tally:
    """Outcomes of the generated requests, by kind."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def problem(self, description: str) -> None:
        self.outcomes["problem"] += 1
        if len(self.problems) < 20:
            self.problems.append(description)


def check_error_body(raw: bytes, status: int, label: str, tally: Tally) -> None:
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        tally.problem(f"{label}: status {status} without a JSON error body: {raw[:200]!r}")
        return
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        tally.problem(f"{label}: status {status} with an error lacking a message: {raw[:200]!r}")
        return
    tally.add(f"error {status}")


def random_fault(rng: random.Random, stream: bool) -> dict[str, Any] | None:
    roll = rng.random()
    if roll < 0.70:
        return None
    choices: list[dict[str, Any]] = [
        {"reset": True},
        {"hang": True},
        {"headers_delay": rng.uniform(0.02, 0.3)},
        {"status": 503, "body": {"error": {"code": 503, "message": "busy", "type": "unavailable_error"}}},
        {"status": 500, "body": {"error": {"code": 500, "message": "boom", "type": "server_error"}}},
        {"reset_after": rng.randint(0, 4)},
        {"close_after": rng.randint(0, 4)},
        {"hang_after": rng.randint(0, 4)},
    ]
    if stream:
        choices.append({"error_after": rng.randint(1, 4)})
        choices.append({"no_done": True})
    else:
        choices.append({"truncate": True})
    return rng.choice(choices)


def random_request(rng: random.Random, index: int) -> tuple[str, str, dict[str, Any]]:
    """Return (kind, path, aiohttp request kwargs) for one generated request."""
    roll = rng.random()
    text = f"chaos {index % 50} " * rng.randint(1, 6)
    tokens = rng.randint(1, 12)

    if roll < 0.08:
        malformed = rng.choice(
            [
                (
                    "bad json",
                    {"data": b'{"messages": [', "headers": {**AUTH, "Content-Type": "application/json"}},
                ),
                ("empty body", {"data": b"", "headers": AUTH}),
                ("model number", {"json": {"model": 7, "messages": []}, "headers": AUTH}),
                ("unknown model", {"json": {"model": "nope", "messages": []}, "headers": AUTH}),
                (
                    "too large",
                    {"json": {"messages": [{"role": "user", "content": "x" * 70000}]}, "headers": AUTH},
                ),
                ("wrong key", {"json": {"messages": []}, "headers": {"Authorization": "Bearer wrong"}}),
            ]
        )
        return f"malformed {malformed[0]}", CHAT_PATH, malformed[1]

    if roll < 0.13:
        path = rng.choice(["/tokenize", "/apply-template"])
        body = {"content": text} if path == "/tokenize" else {"messages": [{"role": "user", "content": text}]}
        return "model route", path, {"json": body, "headers": AUTH}

    stream = rng.random() < 0.6
    fault = random_fault(rng, stream)
    if roll < 0.75:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens,
            "stream": stream,
        }
        path = CHAT_PATH
    elif roll < 0.88:
        body = {"prompt": text, "max_tokens": tokens, "stream": stream}
        path = "/v1/completions"
    else:
        body = {"prompt": text, "n_predict": tokens, "stream": stream}
        path = "/completion"

    if fault is not None:
        body["fake"] = fault
    kind = "stream" if stream else "json"
    return f"{kind}{' fault' if fault else ''}", path, {"json": body, "headers": AUTH}


async def run_one(
    session: aiohttp.ClientSession, url: str, kind: str, path: str, kwargs: dict[str, Any], tally: Tally
) -> None:
    label = f"{kind} {path}"
    async with session.post(url + path, **kwargs) as response:
        if response.status != 200:
            raw = await response.read()
            check_error_body(raw, response.status, label, tally)
            return
        raw, clean = await read_stream(response)
    stream = response.content_type == "text/event-stream"
    if not stream:
        if not clean:
            tally.problem(f"{label}: 200 JSON body cut off")
            return
        try:
            json.loads(raw)
        except ValueError:
            tally.problem(f"{label}: 200 with a body that is not JSON: {raw[:200]!r}")
            return
        tally.add("ok json")
        return
    events = sse_data(raw)
    last = events[-1] if events else ""
    if path != "/completion":
        if clean and last == "[DONE]" and "error" not in raw.decode("utf-8", "replace"):
            tally.add("ok stream")
        elif not clean and last.startswith("{") and "error" in json.loads(last):
            tally.add("stream error event")
        else:
            tally.problem(f"{label}: stream ended clean={clean} with last event {last[:200]!r}")
        return
    if clean and last.startswith("{") and json.loads(last).get("stop") is True:
        tally.add("ok native stream")
    elif last.startswith("{") and "error" in json.loads(last):
        # llama-server ends a native stream cleanly after its own error event,
        # and lcha passes that through. After an error of its own, lcha cuts it.
        tally.add("stream error event")
    else:
        tally.problem(f"{label}: native stream ended clean={clean} with last event {last[:200]!r}")


async def raw_garbage(url: str, rng: random.Random, tally: Tally) -> None:
    """Send an invalid request line, or headers that never finish."""
    host, _sep, port = url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if rng.random() < 0.5:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        else:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: chaos\r\nX-Slow: ")
        answer = await reader.read(200)
        if answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400", b"HTTP/1.1 408")):
            tally.add("garbage rejected")
        else:
            tally.problem(f"garbage: unexpected answer {answer[:80]!r}")
    finally:
        writer.close()


async def restart_backends(fakes_list, rng: random.Random, stop_at: float, log: list[str]) -> None:
    while time.monotonic() < stop_at:
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        fake = rng.choice(fakes_list)
        slots = rng.choice([fake.slots, 1, 2, 3, 4])
        loading = rng.choice([0.0, 0.0, 0.3])
        await fake.stop()
        # Longer than a few health intervals, as for a real process restart.
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        await fake.start(slots=slots, loading=loading)
        log.append(f"restart {fake.url} slots={slots} loading={loading}")


def counters_by_route(server) -> tuple[dict[str, float], dict[str, float]]:
    requests: dict[str, float] = collections.defaultdict(float)
    responses: dict[str, float] = collections.defaultdict(float)
    for family in server.state.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "lcha_requests_total":
                requests[sample.labels["route"]] += sample.value
            elif sample.name == "lcha_responses_total":
                responses[sample.labels["route"]] += sample.value
    return dict(requests), dict(responses)


async def test_chaos_invariants(fakes, lcha):
    seed = int(os.environ.get("LCHA_CHAOS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    backends = await fakes(BACKENDS, slots=2, token_time=0.003, tokens=8)
    server = await lcha(
        backends,
        api_keys=[API_KEY],
        health={"interval": "50ms", "timeout": "500ms", "rise": 2, "fall": 1},
        queue={"max_size": 64, "timeout": "3s"},
        timeouts={"connect": "1s", "first_byte": "1s", "idle": "500ms", "client_read": "1s"},
        max_body_size="64KiB",
    )
    tally = Tally()
    restarts: list[str] = []
    started = time.monotonic()
    stop_at = started + TIME_BUDGET
    pending = iter(range(REQUESTS))
    aborted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal aborted
        for index in pending:
            if time.monotonic() > stop_at:
                return
            if rng.random() < 0.003:
                try:
                    async with asyncio.timeout(CLIENT_TIMEOUT):
                        await raw_garbage(server.url, rng, tally)
                except TimeoutError:
                    tally.problem("garbage: no answer and no close")
                continue
            kind, path, kwargs = random_request(rng, index)
            abort_after = rng.uniform(0.0, 0.3) if rng.random() < 0.1 else None
            call = asyncio.ensure_future(run_one(session, server.url, kind, path, kwargs, tally))
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT):
                    if abort_after is None:
                        await call
                    else:
                        done, _pending = await asyncio.wait({call}, timeout=abort_after)
                        if done:
                            call.result()
                        else:
                            call.cancel()
                            await asyncio.gather(call, return_exceptions=True)
                            aborted += 1
            except TimeoutError:
                tally.problem(f"{kind} {path}: no response within {CLIENT_TIMEOUT:g}s")
            except aiohttp.ClientError as exc:
                tally.problem(f"{kind} {path}: {type(exc).__name__}: {exc}")

    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        chaos = asyncio.create_task(restart_backends(backends, rng, stop_at, restarts))
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        chaos.cancel()
        await asyncio.gather(chaos, return_exceptions=True)

    for fake in backends:
        if not fake.running:
            await fake.start()
    state = server.state
    await server.wait_for(
        lambda: all(b.inflight == 0 for b in state.registry.all_with_retired())
        and len(state.dispatcher) == 0,
        timeout=10,
    )
    # Handlers of aborted clients finish their bookkeeping after the cancel.
    await asyncio.sleep(0.5)
    requests, responses = counters_by_route(server)

    context = f"seed={seed} outcomes={dict(tally.outcomes)} restarts={len(restarts)}"
    total = sum(tally.outcomes.values()) + aborted
    assert tally.problems == [], (context, tally.problems)
    assert total >= min(REQUESTS, 1500), context
    assert tally.outcomes["ok stream"] + tally.outcomes["ok json"] > total // 3, context
    assert len(restarts) >= 10, context
    assert [b.inflight for b in state.registry.all_with_retired()] == [0] * BACKENDS, context
    assert len(state.dispatcher) == 0, context
    assert server.sample("lcha_queue_length") == 0, context
    for fake in backends:
        assert fake.deferred_total == 0, (fake.url, context)
        assert fake.max_concurrent <= 4, (fake.url, context)
    assert requests == responses, context
