"""Dispatcher cost with many backends and a long queue, and memory per queued request.

lcha exposes no dispatcher timing over HTTP, so the timing runs in this
process. It builds a `Dispatcher` over `Backend` objects that are marked
healthy without any poller, leases every slot and queues requests behind them.
Each cycle then releases one lease, waits until the dispatcher hands the slot
to the oldest queued request, and queues one more request, so the queue stays
full.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import tracemalloc
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp

from lcha.affinity import AffinityTable
from lcha.backends import Backend, BackendRegistry, BackendState
from lcha.config import parse_config
from lcha.dispatcher import Dispatcher, PendingRequest
from lcha.metrics import Metrics
from lcha.policies import make_policy
from lcha.slots import Lease, SlotAccounting

from . import loadgen
from .peers import FakeBackends, LchaPeer, available_policies
from .report import ScenarioResult, Table, Target, fmt

if TYPE_CHECKING:
    from .scenarios import Context

BACKENDS = 64
SLOTS = 16
TRIVIAL_POLICY = "first-candidate"


class FirstCandidate:
    """The cheapest possible policy: the first candidate wins."""

    name = TRIVIAL_POLICY

    def choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        return candidates[0] if candidates else None

    def on_dispatch(self, request: PendingRequest, lease: Lease) -> None:
        pass

    def on_result(self, request: PendingRequest, lease: Lease, info: dict[str, Any]) -> None:
        pass


async def scale(ctx: Context) -> ScenarioResult:
    queued = 2000 if ctx.quick else 10_000
    cycles = 300 if ctx.quick else 5000
    rss_queued = 300 if ctx.quick else 10_000
    result = ScenarioResult(
        "scale",
        f"In-process Dispatcher over {BACKENDS} backends x {SLOTS} slots, all slots leased "
        f"and {queued} requests queued. Each of {cycles} cycles releases one lease, waits "
        "until the oldest queued request gets the slot and queues one more. 'decision' is "
        "Dispatcher.decision_seconds / decisions: the candidate filter and the policy, "
        "failed tries that find no free slot included. 'round' is one call of the dispatch "
        "loop's _dispatch_all, and 'cycle' is the wall time of a whole cycle with its task "
        "switches.",
    )
    policies, notes = available_policies()
    result.notes += [n for n in notes if "LiteLLM" not in n]

    table = Table(
        f"Dispatcher at {BACKENDS}x{SLOTS} with {queued} queued (median of repeats)",
        ["policy", "decisions/cycle", "decision us", "round us", "cycle us"],
    )
    decision_by_policy: dict[str, float] = {}
    # A throwaway run, so the first measured policy does not pay for cold code.
    await _time_dispatcher(TRIVIAL_POLICY, 200, 50)
    for policy in [TRIVIAL_POLICY, *policies]:
        runs = [await _time_dispatcher(policy, queued, cycles) for _ in range(ctx.repeat)]
        values = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        decision_by_policy[policy] = values["decision_us"]
        table.add(
            policy,
            fmt(values["decisions"] / cycles, 1),
            fmt(values["decision_us"], 2),
            fmt(values["round_us"], 1),
            fmt(values["cycle_us"], 1),
        )
    result.tables.append(table)

    memory = Table(
        "Memory per queued request",
        ["measure", "queued", "bytes/request"],
    )
    traced = await _traced_bytes_per_request(queued)
    memory.add("tracemalloc, dispatcher only (least_busy)", str(queued), fmt(traced, 0))
    rss_count, rss_per_request = await _rss_per_request(ctx, rss_queued)
    memory.add("lcha process RSS, full HTTP path", str(rss_count), fmt(rss_per_request, 0))
    result.tables.append(memory)
    result.notes.append(
        "tracemalloc counts the queue entry, its future, the waiting task and its timeout, "
        "without a request body. The RSS row is lcha's resident memory growth while "
        "holding that many HTTP requests queued against backends that never answer, after "
        "a warm-up of 100 queued requests. It includes each connection's buffers and "
        "aiohttp's request objects."
    )

    for policy in policies:
        value = decision_by_policy[policy]
        result.targets.append(
            Target(
                f"dispatcher decision <= 50 us at {BACKENDS}x{SLOTS} ({policy})",
                value <= 50.0,
                f"{fmt(value, 2)} us per decision",
            )
        )
    return result


async def _time_dispatcher(policy_name: str, queued: int, cycles: int) -> dict[str, float]:
    dispatcher, leases = await _full_dispatcher(policy_name, queued)
    rounds = 0
    round_seconds = 0.0
    original = dispatcher._dispatch_all

    def timed_dispatch_all() -> float | None:
        nonlocal rounds, round_seconds
        started = time.perf_counter()
        try:
            return original()
        finally:
            rounds += 1
            round_seconds += time.perf_counter() - started

    # The dispatch task looks the method up on each round, so an instance
    # attribute wraps it without touching lcha's code.
    dispatcher._dispatch_all = timed_dispatch_all  # type: ignore[method-assign]
    waiters = _Waiters(dispatcher)
    try:
        for index in range(queued):
            waiters.spawn(f"queued-{index}")
        await waiters.until_queued(queued)
        dispatcher.decisions = 0
        dispatcher.decision_seconds = 0.0
        rounds = 0
        round_seconds = 0.0

        started = time.perf_counter()
        for index in range(cycles):
            await leases.popleft().release()
            leases.append(await waiters.next_lease())
            waiters.spawn(f"refill-{index}")
        elapsed = time.perf_counter() - started
        decisions = dispatcher.decisions
        decision_seconds = dispatcher.decision_seconds
    finally:
        await waiters.cancel()
        await dispatcher.stop()
    return {
        "decisions": decisions,
        "decision_us": decision_seconds / max(decisions, 1) * 1e6,
        "round_us": round_seconds / max(rounds, 1) * 1e6,
        "cycle_us": elapsed / cycles * 1e6,
    }


async def _traced_bytes_per_request(queued: int) -> float:
    dispatcher, _leases = await _full_dispatcher("least_busy", queued)
    waiters = _Waiters(dispatcher)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(queued):
            waiters.spawn(f"queued-{index}")
        await waiters.until_queued(queued)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        await waiters.cancel()
        await dispatcher.stop()
    return (after - before) / queued


async def _full_dispatcher(policy_name: str, queued: int) -> tuple[Dispatcher, deque[Lease]]:
    """Return a started dispatcher whose every slot is leased, and the leases."""
    policy_config = policy_name if policy_name != TRIVIAL_POLICY else "least_busy"
    config = parse_config(
        {
            "backends": [
                {"name": f"b{i}", "url": f"http://127.0.0.1:{20000 + i}", "slots": SLOTS}
                for i in range(BACKENDS)
            ],
            "queue": {"max_size": queued + 1000, "timeout": "1h"},
            "routing": {"policy": policy_config},
        },
        environ={},
    )

    # The registry never starts its pollers here, so it never uses a session.
    registry = BackendRegistry(config, None, on_change=lambda: None)  # type: ignore[arg-type]
    for backend in registry:
        backend.state = BackendState.HEALTHY
        backend.checked = True

    policy = FirstCandidate() if policy_name == TRIVIAL_POLICY else make_policy(config.routing)
    dispatcher = Dispatcher(
        config,
        registry,
        SlotAccounting(),
        policy,
        AffinityTable(config.routing.affinity_ttl, config.routing.affinity_max_entries),
        Metrics(),
    )
    await dispatcher.start()

    leases: deque[Lease] = deque()
    for index in range(BACKENDS * SLOTS):
        leases.append(await dispatcher.acquire(PendingRequest(f"fill-{index}", None, "chat")))
    return dispatcher, leases


class _Waiters:
    """Tasks that each wait in the dispatcher's queue for one lease."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases: deque[Lease] = deque()
        self._arrived = asyncio.Event()

    def spawn(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._wait(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self, request_id: str) -> None:
        lease = await self._dispatcher.acquire(PendingRequest(request_id, None, "chat"))
        self._leases.append(lease)
        self._arrived.set()

    async def until_queued(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._dispatcher) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self._dispatcher)} of {count} requests queued")
            await asyncio.sleep(0)

    async def next_lease(self, timeout: float = 10.0) -> Lease:
        async with asyncio.timeout(timeout):
            while not self._leases:
                self._arrived.clear()
                await self._arrived.wait()
        return self._leases.popleft()

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _rss_per_request(ctx: Context, queued: int) -> tuple[int, float]:
    """Queue `queued` HTTP requests in an lcha process and return (queued, RSS bytes per request)."""
    warmup = 100
    # A prefill cost of 1000 s per token makes every dispatched request hold its
    # slot for the rest of the run, so everything after the first two queues.
    backends = FakeBackends(ctx.work_dir, 2, 1, prefill_cost=1000.0, name="fake-hang")
    lcha = LchaPeer(
        backends,
        "least_busy",
        ctx.work_dir,
        queue_max_size=queued + warmup + 100,
        queue_timeout=600,
    )
    body = json.dumps({"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}).encode()
    tasks: list[asyncio.Task[loadgen.RequestRecord]] = []
    try:
        await backends.start(ctx.session)
        await lcha.start(ctx.session)
        url = lcha.url + "/v1/chat/completions"
        async with loadgen.make_session(0, 900) as session:
            _count, tasks = await _hold_queued(ctx.session, session, lcha.url, url, body, warmup)
            await _cancel(tasks)
            assert lcha.process is not None
            before = lcha.process.rss_bytes()
            count, tasks = await _hold_queued(ctx.session, session, lcha.url, url, body, queued)
            after = lcha.process.rss_bytes()
            await _cancel(tasks)
    finally:
        await _cancel(tasks)
        await lcha.stop()
        await backends.stop()
    return count, (after - before) / max(count, 1)


async def _hold_queued(
    control: aiohttp.ClientSession,
    session: aiohttp.ClientSession,
    base_url: str,
    url: str,
    body: bytes,
    count: int,
    timeout: float = 120.0,
) -> tuple[int, list[asyncio.Task[loadgen.RequestRecord]]]:
    """Send `count` requests that stay queued; return the queue length reached and the tasks."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(loadgen.send(session, url, body, stream=False)) for _ in range(count)]
    reached = 0
    deadline = time.monotonic() + timeout
    # Two requests hold the two backend slots; the rest wait in lcha's queue.
    while time.monotonic() < deadline:
        async with control.get(base_url + "/health") as response:
            reached = (await response.json())["queue"]
        if reached >= count - 2:
            break
        await asyncio.sleep(0.2)
    return reached, tasks


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
