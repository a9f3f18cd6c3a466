"""Queue and dispatcher behaviour on in-memory backends (no network)."""

import asyncio

import pytest

from lcha.affinity import AffinityTable
from lcha.backends import BackendRegistry, BackendState
from lcha.config import BackendConfig, Config, QueueConfig
from lcha.dispatcher import Dispatcher, NoBackend, PendingRequest, QueueFull, QueueTimeout
from lcha.metrics import Metrics
from lcha.policies import LeastBusy, RoundRobin
from lcha.slots import SlotAccounting


def make_config(*backends, max_size=16, timeout=5.0):
    return Config(
        backends=tuple(
            BackendConfig(name=name, url=f"http://127.0.0.1:{9000 + i}", slots=slots, models=models)
            for i, (name, slots, models) in enumerate(backends)
        ),
        queue=QueueConfig(max_size=max_size, timeout=timeout),
    )


@pytest.fixture
async def harness():
    created = []

    async def build(*backends, policy=None, **queue):
        config = make_config(*backends, **queue)
        accounting = SlotAccounting()
        registry = BackendRegistry(config, session=None, on_change=lambda: None)
        for backend in registry:
            backend.state = BackendState.HEALTHY
            backend.capacity = backend.config.slots
        dispatcher = Dispatcher(
            config,
            registry,
            accounting,
            policy or LeastBusy(),
            AffinityTable(600, 1000),
            Metrics(),
        )
        await dispatcher.start()
        created.append(dispatcher)
        return dispatcher

    yield build
    for dispatcher in created:
        await dispatcher.stop()


def request(model="m", rid="r"):
    return PendingRequest(rid, model, "chat")


async def test_slot_cap_under_concurrency(harness):
    dispatcher = await harness(("a", 2, ("m",)), ("b", 2, ("m",)))
    peak = {"a": 0, "b": 0}

    async def one(i):
        lease = await dispatcher.acquire(request(rid=str(i)))
        try:
            backend = lease.backend
            peak[backend.name] = max(peak[backend.name], backend.inflight)
            assert backend.inflight <= backend.capacity
            await asyncio.sleep(0.01)
        finally:
            await lease.release()

    await asyncio.gather(*(one(i) for i in range(12)))
    assert peak == {"a": 2, "b": 2}
    assert [b.inflight for b in dispatcher.registry] == [0, 0]
    assert len(dispatcher) == 0


async def test_fifo_within_model(harness):
    dispatcher = await harness(("a", 1, ("m",)))
    first = await dispatcher.acquire(request(rid="first"))
    order = []

    async def waiter(name):
        lease = await dispatcher.acquire(request(rid=name))
        order.append(name)
        await lease.release()

    tasks = []
    for name in ("w1", "w2", "w3"):
        tasks.append(asyncio.create_task(waiter(name)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert len(dispatcher) == 3
    await first.release()
    await asyncio.gather(*tasks)
    assert order == ["w1", "w2", "w3"]


async def test_full_model_does_not_block_other_model(harness):
    dispatcher = await harness(("a", 1, ("x",)), ("b", 1, ("y",)))
    busy = await dispatcher.acquire(request("x", "x1"))
    blocked = asyncio.create_task(dispatcher.acquire(request("x", "x2")))
    await asyncio.sleep(0.01)
    lease = await asyncio.wait_for(dispatcher.acquire(request("y", "y1")), 1)
    assert lease.backend.name == "b"
    assert not blocked.done()
    await busy.release()
    unblocked = await blocked
    assert unblocked.backend.name == "a"
    await unblocked.release()
    await lease.release()


async def test_queue_full_rejects(harness):
    dispatcher = await harness(("a", 1, ("m",)), max_size=2)
    held = await dispatcher.acquire(request())
    waiting = [asyncio.create_task(dispatcher.acquire(request(rid=f"w{i}"))) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await dispatcher.acquire(request(rid="over"))
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await held.release()


async def test_queue_timeout(harness):
    dispatcher = await harness(("a", 1, ("m",)), timeout=0.05)
    held = await dispatcher.acquire(request())
    with pytest.raises(QueueTimeout):
        await dispatcher.acquire(request(rid="late"))
    assert len(dispatcher) == 0
    await held.release()
    assert dispatcher.registry.get("a").inflight == 0


async def test_cancelled_waiter_never_dispatched(harness):
    dispatcher = await harness(("a", 1, ("m",)))
    held = await dispatcher.acquire(request())
    gone = asyncio.create_task(dispatcher.acquire(request(rid="gone")))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert len(dispatcher) == 0
    await held.release()
    await asyncio.sleep(0.01)
    backend = dispatcher.registry.get("a")
    assert backend.inflight == 0
    assert backend.acquired_total == 1


async def test_cancel_racing_dispatch_releases(harness):
    dispatcher = await harness(("a", 1, ("m",)))
    held = await dispatcher.acquire(request())
    racer = asyncio.create_task(dispatcher.acquire(request(rid="racer")))
    await asyncio.sleep(0.01)
    # The release wakes the dispatcher, which grants the slot to the racer in
    # the same iteration in which the racer is cancelled.
    await held.release()
    racer.cancel()
    await asyncio.gather(racer, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert dispatcher.registry.get("a").inflight == 0


async def test_unknown_and_unhealthy_model(harness):
    dispatcher = await harness(("a", 1, ("m",)))
    with pytest.raises(NoBackend):
        dispatcher.check_routable(request("other"))
    dispatcher.registry.get("a").state = BackendState.UNHEALTHY
    with pytest.raises(NoBackend):
        dispatcher.check_routable(request("m"))


async def test_missing_model_uses_any_backend(harness):
    dispatcher = await harness(("a", 1, ("x",)), ("b", 1, ("y",)))
    first = await dispatcher.acquire(request(None, "1"))
    second = await dispatcher.acquire(request(None, "2"))
    assert {first.backend.name, second.backend.name} == {"a", "b"}
    await first.release()
    await second.release()


async def test_double_release_counts_once(harness):
    dispatcher = await harness(("a", 2, ("m",)))
    lease = await dispatcher.acquire(request())
    await lease.release()
    await lease.release()
    assert dispatcher.registry.get("a").inflight == 0


async def test_release_after_backend_replaced(harness):
    dispatcher = await harness(("a", 2, ("m",)))
    old = dispatcher.registry.get("a")
    lease = await dispatcher.acquire(request())
    # A reload that moves "a" to another URL retires the old object; the new
    # one must not be touched by the old lease.
    new_config = make_config(("a", 2, ("m",)))
    moved = BackendConfig(name="a", url="http://127.0.0.1:9999", slots=2, models=("m",))
    dispatcher.registry._start_poller = lambda backend: None
    dispatcher.registry.reconfigure(new_config.replace(backends=(moved,)))
    fresh = dispatcher.registry.get("a")
    assert fresh is not old
    await lease.release()
    assert old.inflight == 0
    assert fresh.inflight == 0


async def test_least_busy_prefers_free_slots(harness):
    dispatcher = await harness(("a", 4, ("m",)), ("b", 4, ("m",)))
    leases = [await dispatcher.acquire(request(rid=str(i))) for i in range(4)]
    counts = {"a": 0, "b": 0}
    for lease in leases:
        counts[lease.backend.name] += 1
    assert counts == {"a": 2, "b": 2}
    for lease in leases:
        await lease.release()


async def test_round_robin_rotates(harness):
    dispatcher = await harness(("a", 4, ("m",)), ("b", 4, ("m",)), policy=RoundRobin())
    names = []
    for i in range(4):
        lease = await dispatcher.acquire(request(rid=str(i)))
        names.append(lease.backend.name)
        await lease.release()
    assert names == ["a", "b", "a", "b"]


async def test_external_busy_counts_as_taken(harness):
    dispatcher = await harness(("a", 2, ("m",)), timeout=0.05)
    dispatcher.registry.get("a").external_busy = 2
    with pytest.raises(QueueTimeout):
        await dispatcher.acquire(request())


async def test_retry_excludes_failed_backend(harness):
    dispatcher = await harness(("a", 1, ("m",)), ("b", 1, ("m",)))
    pending = request()
    lease = await dispatcher.acquire(pending)
    failed = lease.backend
    await lease.release()
    dispatcher.requeue(pending, failed)
    retry = await dispatcher.acquire(pending)
    assert retry.backend is not failed
    await retry.release()


async def test_blocked_kind_does_not_block_others(harness):
    dispatcher = await harness(("a", 1, ("m",)), ("b", 1, ("m",)))
    a = dispatcher.registry.get("a")
    b = dispatcher.registry.get("b")
    held = await dispatcher.acquire(request(rid="held"))
    other_free = b if held.backend is a else a
    # A retry that may not use the free backend waits for the busy one...
    retry = request(rid="retry")
    retry.exclude.add(other_free)
    waiting = asyncio.create_task(dispatcher.acquire(retry))
    await asyncio.sleep(0.01)
    # ...while a later request of the same model takes the free backend.
    later = await asyncio.wait_for(dispatcher.acquire(request(rid="later")), 1)
    assert later.backend is other_free
    assert not waiting.done()
    await held.release()
    retried = await asyncio.wait_for(waiting, 1)
    assert retried.backend is held.backend
    await retried.release()
    await later.release()
