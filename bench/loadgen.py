"""Load generator: closed-loop workers, open-loop arrivals and per-request records.

Every request is a POST with a pre-encoded JSON body. The record keeps the
time to first token as the client sees it. For a plain response that is the
first body byte. For a stream it is the first chunk that contains an SSE
``data:`` event, because llama-server sends stream headers (and, during a long
prefill, comment pings) before the prompt is processed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(slots=True)
class RequestRecord:
    """Client-side measurements of one request."""

    start: float
    """Seconds from the start of the run to sending the request."""
    ttft: float | None
    """Seconds to the first body byte, or to the first SSE data event of a stream."""
    total: float
    """Seconds to the end of the response body."""
    status: int
    """HTTP status, 0 when no response arrived."""
    cache_n: int | None = None
    """Prompt tokens the backend reported as cached (timings.cache_n)."""
    prompt_tokens: int | None = None
    """Prompt tokens, cached ones included."""
    completion_tokens: int | None = None
    events: int = 0
    """SSE data events received, ``data: [DONE]`` included."""
    error: str = ""
    content: str = ""
    """Generated text, kept only when the caller asks for it."""
    user: int = -1
    turn: int = -1

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def make_session(limit: int, timeout: float) -> aiohttp.ClientSession:
    """Return a client session with at most `limit` connections (0: no limit).

    `trust_env` stays false, so proxy variables can never send bench traffic
    off the machine.
    """
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        trust_env=False,
    )


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    stream: bool,
    started_at: float = 0.0,
    keep_content: bool = False,
) -> RequestRecord:
    """POST `body` to `url` and return its record, also for a transport error."""
    started = time.perf_counter()
    ttft: float | None = None
    chunks: list[bytes] = []
    status = 0
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            status = response.status
            async for chunk in response.content.iter_any():
                if ttft is None and (not stream or b"data:" in chunk):
                    ttft = time.perf_counter() - started
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return RequestRecord(
            start=started - started_at,
            ttft=ttft,
            total=time.perf_counter() - started,
            status=status,
            error=f"{type(exc).__name__}: {exc}",
        )
    total = time.perf_counter() - started

    data = b"".join(chunks)
    record = RequestRecord(start=started - started_at, ttft=ttft, total=total, status=status)
    if status != 200:
        record.error = data[:200].decode("utf-8", "replace")
        return record
    if stream:
        _read_stream(record, data, keep_content)
    else:
        _read_body(record, data, keep_content)
    return record


async def run_closed(
    concurrency: int,
    count: int,
    job: Callable[[int], Awaitable[RequestRecord]],
    time_limit: float,
) -> tuple[list[RequestRecord], float]:
    """Run `count` jobs on `concurrency` workers that each wait for their last reply.

    Returns the records and the wall time. Workers stop taking jobs after
    `time_limit` seconds, and jobs still running 5 s later are cancelled.
    """
    records: list[RequestRecord] = []
    next_index = 0
    started = time.perf_counter()
    deadline = started + time_limit

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            records.append(await job(index))

    await _gather_until([worker() for _ in range(min(concurrency, count))], deadline + 5.0)
    return records, time.perf_counter() - started


async def run_open(
    arrivals: Sequence[float],
    job: Callable[[int], Awaitable[RequestRecord]],
    time_limit: float,
) -> tuple[list[RequestRecord], float]:
    """Start job i at `arrivals[i]` seconds after the start, whatever is still running.

    Returns the records and the wall time. Jobs not finished `time_limit`
    seconds after the start are cancelled and get no record.
    """
    records: list[RequestRecord] = []
    started = time.perf_counter()
    deadline = started + time_limit
    tasks: list[asyncio.Task[None]] = []

    async def one(index: int) -> None:
        records.append(await job(index))

    loop = asyncio.get_running_loop()
    for index, offset in enumerate(arrivals):
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() >= deadline:
            break
        tasks.append(loop.create_task(one(index)))
    await _gather_until(tasks, deadline)
    return records, time.perf_counter() - started


async def run_users(
    users: int,
    user_job: Callable[[int], Awaitable[list[RequestRecord]]],
    time_limit: float,
) -> tuple[list[RequestRecord], float]:
    """Run one coroutine per user, each sending its own sequence of requests."""
    records: list[RequestRecord] = []
    started = time.perf_counter()

    async def one(user: int) -> None:
        records.extend(await user_job(user))

    await _gather_until([one(user) for user in range(users)], started + time_limit)
    return records, time.perf_counter() - started


def log_failures(label: str, records: Sequence[RequestRecord]) -> None:
    """Log how many requests failed and up to three distinct reasons."""
    failed = [r for r in records if not r.ok]
    if not failed:
        return
    reasons = sorted({f"HTTP {r.status}: {r.error[:160]}" for r in failed})
    log.warning("requests failed peer=%s failed=%d reasons=%s", label, len(failed), reasons[:3])


async def _gather_until(
    coroutines: Sequence[Coroutine[Any, Any, Any] | asyncio.Task[Any]], deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    tasks = [c if isinstance(c, asyncio.Task) else loop.create_task(c) for c in coroutines]
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0.0))
    for task in pending:
        task.cancel()
    if pending:
        log.warning("run hit its time limit cancelled=%d", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _read_body(record: RequestRecord, data: bytes, keep_content: bool) -> None:
    try:
        payload = json.loads(data)
    except ValueError:
        record.error = "response body is not JSON"
        return
    if not isinstance(payload, dict):
        return
    _read_usage(record, payload)
    if keep_content:
        choices = payload.get("choices") or [{}]
        message = choices[0].get("message") or {}
        record.content = message.get("content") or choices[0].get("text") or ""


def _read_stream(record: RequestRecord, data: bytes, keep_content: bool) -> None:
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data:")]
    record.events = len(events)
    if not events or events[-1].strip() != b"data: [DONE]":
        record.error = "stream ended without data: [DONE]"
    # Usage and timings come in the last events, so scanning from the end
    # stops after one or two JSON decodes instead of one per token.
    for event in reversed(events):
        text = event[5:].strip()
        if not text.startswith(b"{") or b'"timings"' not in text:
            continue
        try:
            _read_usage(record, json.loads(text))
        except ValueError:
            continue
        break
    if keep_content:
        pieces = []
        for event in events:
            text = event[5:].strip()
            if not text.startswith(b"{"):
                continue
            try:
                choices = json.loads(text).get("choices") or []
            except ValueError:
                continue
            for choice in choices:
                delta = choice.get("delta") or {}
                pieces.append(delta.get("content") or choice.get("text") or "")
        record.content = "".join(pieces)


def _read_usage(record: RequestRecord, payload: dict[str, Any]) -> None:
    timings = payload.get("timings")
    usage = payload.get("usage")
    if isinstance(timings, dict):
        cached = timings.get("cache_n")
        processed = timings.get("prompt_n")
        if isinstance(cached, int):
            record.cache_n = cached
        if isinstance(processed, int):
            record.prompt_tokens = processed + (cached if isinstance(cached, int) else 0)
        predicted = timings.get("predicted_n")
        if isinstance(predicted, int):
            record.completion_tokens = predicted
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            record.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            record.completion_tokens = usage["completion_tokens"]
