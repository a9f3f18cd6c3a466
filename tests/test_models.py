"""Router-mode backends: model loads, queue skips, unload delay, model limits."""

import asyncio
import json

import pytest

from lcha.affinity import AffinityTable
from lcha.backends import BackendRegistry, BackendState
from lcha.config import BackendConfig, Config, QueueConfig, RoutingConfig
from lcha.dispatcher import Dispatcher, PendingRequest
from lcha.metrics import Metrics
from lcha.policies import LeastBusy
from lcha.slots import SlotAccounting

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


# --- in-memory router backends -------------------------------------------------------


@pytest.fixture
async def router_dispatcher():
    """Factory: one in-memory router backend serving A and C, A loaded, two slots per model."""
    created = []

    async def build(max_queue_skip):
        config = Config(
            backends=(BackendConfig(name="r", url="http://127.0.0.1:9100", max_models=1),),
            queue=QueueConfig(max_size=32, timeout=5.0),
            routing=RoutingConfig(max_queue_skip=max_queue_skip, model_unload_delay=0.0),
        )
        registry = BackendRegistry(config, session=None, on_change=lambda: None)
        backend = registry.get("r")
        backend.state = BackendState.HEALTHY
        backend.router_mode = True
        backend.models = frozenset({"A", "C"})
        backend.loaded_models = {"A"}
        backend.model_slots = {"A": 2, "C": 2}
        dispatcher = Dispatcher(
            config, registry, SlotAccounting(), LeastBusy(), AffinityTable(600, 1000), Metrics()
        )
        await dispatcher.start()
        created.append(dispatcher)
        return dispatcher, backend

    yield build
    for dispatcher in created:
        await dispatcher.stop()


async def settle():
    # The dispatcher task runs a round after each notify; give it a few turns.
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


def queued(dispatcher, request, order):
    async def wait():
        lease = await dispatcher.acquire(request)
        order.append(request.request_id)
        return lease

    return asyncio.create_task(wait())


async def test_skipped_request_served_after_limit(router_dispatcher):
    dispatcher, backend = await router_dispatcher(max_queue_skip=2)
    running = [await dispatcher.acquire(PendingRequest(f"a{i}", "A", "chat")) for i in (1, 2)]
    order: list[str] = []
    load = PendingRequest("c", "C", "chat")
    c_task = queued(dispatcher, load, order)
    await settle()
    a_tasks = [queued(dispatcher, PendingRequest(f"a{i}", "A", "chat"), order) for i in (3, 4, 5)]
    await settle()

    # Each release frees one A slot; a younger A request may take it until
    # the load of C has been skipped twice. Then A drains and C loads.
    leases = {}
    for _ in range(4):
        await running.pop(0).release()
        await settle()
        for task in [c_task, *a_tasks]:
            if task.done() and task not in leases:
                leases[task] = task.result()
                if task is not c_task:
                    running.append(task.result())

    assert order == ["a3", "a4", "c"]
    assert load.skips == 2
    assert dispatcher.metrics.registry.get_sample_value(
        "lcha_queue_skips_total", {"model": "C"}
    ) == 2
    assert not a_tasks[2].done()
    assert backend.loaded_models == {"C"}

    await leases[c_task].release()
    await settle()
    assert a_tasks[2].done()
    for lease in [*running, a_tasks[2].result()]:
        await lease.release()


async def test_no_skips_is_strict_fifo(router_dispatcher):
    dispatcher, _backend = await router_dispatcher(max_queue_skip=0)
    running = [await dispatcher.acquire(PendingRequest(f"a{i}", "A", "chat")) for i in (1, 2)]
    order: list[str] = []
    load = PendingRequest("c", "C", "chat")
    c_task = queued(dispatcher, load, order)
    await settle()
    a_task = queued(dispatcher, PendingRequest("a3", "A", "chat"), order)
    await settle()

    await running[0].release()
    await settle()
    assert order == []
    await running[1].release()
    await settle()

    assert order == ["c"]
    assert load.skips == 0
    await (await c_task).release()
    await settle()
    assert order == ["c", "a3"]
    await (await a_task).release()


async def test_load_waits_while_model_busy(router_dispatcher):
    dispatcher, backend = await router_dispatcher(max_queue_skip=8)
    busy = await dispatcher.acquire(PendingRequest("a1", "A", "chat"))
    order: list[str] = []
    c_task = queued(dispatcher, PendingRequest("c", "C", "chat"), order)
    await settle()

    assert order == []
    assert backend.loaded_models == {"A"}
    await busy.release()
    await settle()
    assert order == ["c"]
    assert dispatcher.metrics.registry.get_sample_value(
        "lcha_model_loads_total", {"backend": "r", "model": "C"}
    ) == 1
    await (await c_task).release()


# --- fake router backends through lcha ----------------------------------------------------


async def complete(http, server, model, **extra):
    body = {**CHAT, "model": model, **extra}
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        raw = await response.read()
        return response.status, raw, response.headers.get("X-Lcha-Backend")


def is_complete(raw, stream):
    if stream:
        return raw.rstrip().endswith(b"data: [DONE]")
    return json.loads(raw)["choices"][0]["finish_reason"] in ("length", "stop")


async def test_poll_loads_no_model(fakes, lcha):
    (fake,) = await fakes(1, router=True, models=["a", "b"], models_max=2, slots=3)
    server = await lcha([fake])
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.router_max_models == 2)
    await asyncio.sleep(0.3)

    assert backend.router_mode
    assert sum(fake.loads.values()) == 0
    assert backend.loaded_models == set()


async def test_router_slots_counted_per_model(fakes, lcha, http):
    (fake,) = await fakes(1, router=True, models=["a", "b"], models_max=2, slots=3)
    server = await lcha([fake])
    backend = server.state.registry.get("b0")
    status, _raw, _name = await complete(http, server, "a")
    await server.wait_for(lambda: backend.model_slots.get("a") == 3)

    assert status == 200
    assert backend.loaded_models == {"a"}
    assert backend.capacity == 3
    assert server.sample("lcha_model_loads_total", backend="b0", model="a") == 1


async def test_busy_model_never_evicted(fakes, lcha, http):
    # With evict_busy the fake evicts busy models and counts the requests it
    # aborts, so any load lcha sends over a busy model shows up.
    backends = await fakes(
        2,
        router=True,
        models=["a", "b", "c"],
        models_max=1,
        evict_busy=True,
        slots=2,
        token_time=0.004,
        tokens=12,
    )
    server = await lcha(backends, routing={"max_queue_skip": 3})

    async def one(i):
        stream = i % 2 == 0
        status, raw, _name = await complete(http, server, "abc"[i % 3], stream=stream)
        return status, is_complete(raw, stream)

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), 60)

    assert [status for status, _ in results] == [200] * 30
    assert all(done for _, done in results)
    assert [fake.aborted_by_unload for fake in backends] == [0, 0]
    lcha_loads = sum(
        server.sample("lcha_model_loads_total", backend=f"b{i}", model=m)
        for i in range(2)
        for m in "abc"
    )
    assert lcha_loads == sum(sum(fake.loads.values()) for fake in backends)


async def test_max_models_below_router_limit(fakes, lcha, http):
    (fake,) = await fakes(1, router=True, models=["a", "b"], models_max=4, token_time=0.002)
    server = await lcha([fake], backend_options={"max_models": 1})
    backend = server.state.registry.get("b0")
    await server.wait_for(lambda: backend.router_max_models == 4)
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            states = fake.stats()["models"].values()
            peak = max(peak, sum(1 for s in states if s in ("loaded", "loading")))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        first = await complete(http, server, "a")
        second = await asyncio.wait_for(complete(http, server, "b"), 10)
    finally:
        watcher.cancel()

    assert first[0] == 200
    assert second[0] == 200
    assert fake.unloads["a"] == 1
    assert peak == 1


async def test_unload_delay_keeps_recent_model(fakes, lcha, http):
    backends = await fakes(2, router=True, models=["a", "b", "c"], models_max=1)
    # Round robin sends the first request for a model to the first backend
    # that can take it, so without the delay "c" would replace "a" on b0.
    server = await lcha(backends, routing={"policy": "round_robin", "model_unload_delay": "1s"})
    first = await complete(http, server, "a")
    second = await complete(http, server, "b")
    await asyncio.sleep(1.2)
    recent = await complete(http, server, "a")

    status, _raw, c_backend = await complete(http, server, "c")
    follow_up = await complete(http, server, "a")

    assert [first[2], second[2], recent[2]] == ["b0", "b1", "b0"]
    assert status == 200
    assert c_backend == "b1"
    assert follow_up[2] == "b0"
    assert sum(fake.loads["a"] for fake in backends) == 1


async def test_model_limit_caps_concurrency(fakes, lcha, http):
    (fake,) = await fakes(1, model="m", slots=4, token_time=0.01, tokens=8)
    server = await lcha([fake], routing={"model_limits": {"m": 1}})

    results = await asyncio.gather(*(complete(http, server, "m") for _ in range(3)))

    assert [status for status, _raw, _name in results] == [200] * 3
    assert fake.max_concurrent == 1


async def test_models_listed_once(fakes, lcha, http):
    first = (await fakes(1, router=True, models=["a", "b"], models_max=1))[0]
    second = (await fakes(1, router=True, models=["b", "c"], models_max=1))[0]
    server = await lcha([first, second])
    async with http.get(server.url + "/v1/models") as response:
        data = (await response.json())["data"]

    assert sorted(m["id"] for m in data) == ["a", "b", "c"]
    assert next(m for m in data if m["id"] == "b")["backends"] == ["b0", "b1"]


async def test_tokenize_prefers_loaded_model(fakes, lcha, http):
    backends = await fakes(2, router=True, models=["a", "b"], models_max=1)
    server = await lcha(backends)
    await complete(http, server, "a")
    loaded_on = next(b for b in server.state.registry if "a" in b.loaded_models)
    for _ in range(4):
        async with http.post(
            server.url + "/tokenize", json={"model": "a", "content": "hello"}
        ) as response:
            assert response.status == 200
            assert response.headers["X-Lcha-Backend"] == loaded_on.name
    assert sum(fake.loads["a"] for fake in backends) == 1
