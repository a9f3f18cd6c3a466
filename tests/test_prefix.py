"""Prefix-cache-aware routing: the chunk index and the `prefix` policy."""

import asyncio
import time

import pytest

from lcha.affinity import AffinityTable
from lcha.backends import Backend, BackendRegistry, BackendState
from lcha.config import BackendConfig, Config, QueueConfig, RoutingConfig
from lcha.dispatcher import Dispatcher, PendingRequest
from lcha.metrics import Metrics
from lcha.prefix import (
    DATA_KEY,
    PrefixIndex,
    PrefixPolicy,
    build_prefix,
    chunk_chain,
    rendezvous_weight,
)
from lcha.slots import SlotAccounting

CHUNK = 16


def make_backend(name, slots=4, busy=0, port=9000):
    backend = Backend(
        BackendConfig(name=name, url=f"http://127.0.0.1:{port}", slots=slots, models=("m",))
    )
    backend.state = BackendState.HEALTHY
    backend.capacity = slots
    backend.inflight = busy
    return backend


def make_policy(metrics=None, **overrides):
    settings = {"policy": "prefix", "prefix_chunk_size": CHUNK}
    settings.update(overrides)
    return PrefixPolicy(RoutingConfig(**settings), metrics)


def conversation(*turns, system="You are a careful assistant that answers briefly."):
    messages = [{"role": "system", "content": system}]
    for number, text in enumerate(turns):
        messages.append({"role": "user" if number % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def request(body, rid="r"):
    return PendingRequest(rid, "m", "chat", body)


def serve(policy, accounting, pending, backend, cached_tokens=0, prompt_ms=None, slot_id=None):
    """Dispatch `pending` to `backend`, report a response and free the slot."""
    lease = accounting.acquire(backend, "m", pending.request_id)
    policy.on_dispatch(pending, lease)
    prefix = pending.data[DATA_KEY]
    info = {"cached_tokens": cached_tokens, "prompt_tokens": max(prefix.chars // 4, 1)}
    if prompt_ms is not None:
        info["prompt_ms"] = prompt_ms
    if slot_id is not None:
        info["slot_id"] = slot_id
    policy.on_result(pending, lease, info)
    accounting.give_back(lease)
    return lease


def chain_of(text):
    return chunk_chain(text, CHUNK)


# --- chains ---------------------------------------------------------------------


def test_chain_prefix_stable_across_turns():
    first = build_prefix(conversation("What is a KV cache?"), "chat", CHUNK)
    second = build_prefix(
        conversation("What is a KV cache?", "Stored attention keys.", "And a slot?"), "chat", CHUNK
    )
    assert second.chain[: len(first.chain)] == first.chain
    assert len(second.chain) > len(first.chain)


def test_chain_key_same_for_every_turn():
    first = build_prefix(conversation("What is a KV cache?"), "chat", CHUNK)
    second = build_prefix(conversation("What is a KV cache?", "Keys.", "More?"), "chat", CHUNK)
    assert first.key == second.key


def test_chain_key_differs_between_conversations():
    first = build_prefix(conversation("What is a KV cache?"), "chat", CHUNK)
    other = build_prefix(conversation("How do slots work?"), "chat", CHUNK)
    assert first.key != other.key


def test_chain_depends_on_model():
    body = conversation("Explain paging in detail.")
    first = build_prefix(body, "chat", CHUNK, "model-a")
    other = build_prefix(body, "chat", CHUNK, "model-b")
    assert first.chain[0] != other.chain[0]


def test_chain_drops_partial_chunk():
    assert len(chain_of("x" * (CHUNK * 3 + 5))) == 3


def test_chain_completion_prompt():
    prefix = build_prefix({"prompt": "a" * (CHUNK * 2)}, "completions", CHUNK)
    assert prefix.chain == chain_of("a" * (CHUNK * 2))


def test_chain_empty_without_prompt_cache():
    body = dict(conversation("x" * 100), cache_prompt=False)
    assert build_prefix(body, "chat", CHUNK).chain == []


def test_chain_empty_for_embeddings():
    assert build_prefix({"input": "x" * 100}, "embeddings", CHUNK).chain == []


# --- index ----------------------------------------------------------------------


def test_index_hit():
    index = PrefixIndex(max_chunks=100, ttl=60)
    cached = chain_of("a" * CHUNK * 4)
    index.insert(cached, "b1", now=0.0)
    longer = chain_of("a" * CHUNK * 4 + "b" * CHUNK * 2)
    assert index.match(longer, now=1.0) == {"b1": 4}


def test_index_miss():
    index = PrefixIndex(max_chunks=100, ttl=60)
    index.insert(chain_of("a" * CHUNK * 4), "b1", now=0.0)
    assert index.match(chain_of("c" * CHUNK * 4), now=1.0) == {}


def test_index_depth_per_backend():
    index = PrefixIndex(max_chunks=100, ttl=60)
    index.insert(chain_of("a" * CHUNK * 2), "b1", now=0.0)
    index.insert(chain_of("a" * CHUNK * 5), "b2", now=0.0)
    assert index.match(chain_of("a" * CHUNK * 6), now=1.0) == {"b1": 2, "b2": 5}


def test_index_lru_eviction():
    index = PrefixIndex(max_chunks=6, ttl=60)
    old = chain_of("a" * CHUNK * 4)
    new = chain_of("b" * CHUNK * 4)
    index.insert(old, "b1", now=0.0)
    index.insert(new, "b1", now=1.0)
    assert len(index) == 6
    # The deepest chunks go first, so the old chain keeps a usable prefix.
    assert index.match(old, now=2.0) == {"b1": 2}
    assert index.match(new, now=2.0) == {"b1": 4}


def test_index_lru_touch_keeps_entry():
    index = PrefixIndex(max_chunks=8, ttl=60)
    first = chain_of("a" * CHUNK * 4)
    index.insert(first, "b1", now=0.0)
    index.insert(chain_of("b" * CHUNK * 4), "b1", now=1.0)
    index.insert(first, "b1", now=2.0)
    index.insert(chain_of("c" * CHUNK * 4), "b1", now=3.0)
    assert index.match(first, now=4.0) == {"b1": 4}


def test_index_ttl_expiry():
    index = PrefixIndex(max_chunks=100, ttl=10)
    cached = chain_of("a" * CHUNK * 4)
    index.insert(cached, "b1", now=0.0)
    assert index.match(cached, now=9.0) == {"b1": 4}
    assert index.match(cached, now=10.5) == {}


def test_index_ttl_purges_memory():
    index = PrefixIndex(max_chunks=100, ttl=10)
    index.insert(chain_of("a" * CHUNK * 4), "b1", now=0.0)
    index.insert(chain_of("b" * CHUNK * 2), "b1", now=20.0)
    assert len(index) == 2


def test_index_pending_not_matched():
    index = PrefixIndex(max_chunks=100, ttl=60)
    cached = chain_of("a" * CHUNK * 3)
    index.insert(cached, "b1", now=0.0, pending=True)
    assert index.match(cached, now=1.0) == {}
    index.insert(cached, "b1", now=2.0)
    assert index.match(cached, now=3.0) == {"b1": 3}


def test_index_pending_keeps_confirmed():
    index = PrefixIndex(max_chunks=100, ttl=60)
    cached = chain_of("a" * CHUNK * 3)
    index.insert(cached, "b1", now=0.0)
    index.insert(cached, "b1", now=1.0, pending=True)
    assert index.match(cached, now=2.0) == {"b1": 3}


def test_index_trim():
    index = PrefixIndex(max_chunks=100, ttl=60)
    cached = chain_of("a" * CHUNK * 5)
    index.insert(cached, "b1", now=0.0)
    assert index.trim(cached, "b1", keep=2) == 3
    assert index.match(cached, now=1.0) == {"b1": 2}


def test_index_forget_backend():
    index = PrefixIndex(max_chunks=100, ttl=60)
    cached = chain_of("a" * CHUNK * 3)
    index.insert(cached, "b1", now=0.0)
    index.insert(cached, "b2", now=0.0)
    index.forget_backend("b1")
    assert index.match(cached, now=1.0) == {"b2": 3}
    assert index.cached_chunks("b1") == 0


def test_index_slot_overwrite():
    index = PrefixIndex(max_chunks=100, ttl=60)
    first = chain_of("s" * CHUNK * 2 + "a" * CHUNK * 3)
    second = chain_of("s" * CHUNK * 2 + "b" * CHUNK * 3)
    index.insert(first, "b1", now=0.0, slot=0)
    index.insert(second, "b1", now=1.0, slot=0)
    assert index.match(first, now=2.0) == {"b1": 2}
    assert index.slot_of(second, 5, "b1", now=2.0) == 0


def test_index_cached_chunks_count():
    index = PrefixIndex(max_chunks=100, ttl=60)
    index.insert(chain_of("a" * CHUNK * 3), "b1", now=0.0)
    index.insert(chain_of("a" * CHUNK * 4), "b1", now=1.0)
    assert index.cached_chunks("b1") == 4


# --- policy: choice -------------------------------------------------------------


def test_choose_warm_backend():
    policy = make_policy()
    accounting = SlotAccounting()
    a, b = make_backend("a"), make_backend("b")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    a.inflight = 2
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    assert policy.choose(turn, [a, b]) is a


def test_choose_imbalance_fallback():
    policy = make_policy(prefix_imbalance=2)
    accounting = SlotAccounting()
    a, b = make_backend("a", slots=8), make_backend("b", slots=8)
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    a.inflight = 3
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    assert policy.choose(turn, [a, b]) is b


def test_choose_deeper_prefix_wins():
    policy = make_policy()
    accounting = SlotAccounting()
    a, b = make_backend("a"), make_backend("b")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    long_turns = ("Explain paging in detail.", "Pages map virtual memory to frames.", "Go on.")
    serve(policy, accounting, request(conversation(*long_turns)), b)
    turn = request(conversation(*long_turns, "Frames are fixed size.", "Why?"))
    assert policy.choose(turn, [a, b]) is b


def test_choose_cold_spread_least_valuable():
    policy = make_policy()
    a, b, c = make_backend("a"), make_backend("b"), make_backend("c")
    policy.index.insert(chain_of("a" * CHUNK * 8), "a", now=time.monotonic())
    policy.index.insert(chain_of("b" * CHUNK * 2), "b", now=time.monotonic())
    policy.index.insert(chain_of("c" * CHUNK * 4), "c", now=time.monotonic())
    embedding = PendingRequest("e", "m", "embeddings", {"input": "hello"})
    assert policy.choose(embedding, [a, b, c]) is b


def test_choose_cold_spread_prefers_least_busy():
    policy = make_policy()
    a, b = make_backend("a", busy=1), make_backend("b", busy=0)
    policy.index.insert(chain_of("b" * CHUNK * 8), "b", now=time.monotonic())
    embedding = PendingRequest("e", "m", "embeddings", {"input": "hello"})
    assert policy.choose(embedding, [a, b]) is b


def test_choose_fallback_avoids_valuable_cache():
    policy = make_policy(prefix_imbalance=0)
    accounting = SlotAccounting()
    a, b, c = make_backend("a"), make_backend("b"), make_backend("c")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    policy.index.insert(chain_of("z" * CHUNK * 20), "b", now=time.monotonic())
    a.inflight = 1
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    assert policy.choose(turn, [a, b, c]) is c


# --- policy: rendezvous -----------------------------------------------------------


def test_rendezvous_agreement_two_instances():
    names = [f"b{i}" for i in range(8)]
    first = make_policy()
    second = make_policy()
    first_backends = [make_backend(name, port=9000 + i) for i, name in enumerate(names)]
    second_backends = [make_backend(name, port=9000 + i) for i, name in enumerate(names)]
    chosen = set()
    for number in range(40):
        body = conversation(f"Question number {number} about caches?")
        left = first.choose(request(body), first_backends)
        right = second.choose(request(body), second_backends)
        assert left.name == right.name
        chosen.add(left.name)
    assert len(chosen) > 1


def test_rendezvous_next_turn_on_other_instance():
    accounting = SlotAccounting()
    first, second = make_policy(), make_policy()
    first_backends = [make_backend(f"b{i}", port=9000 + i) for i in range(6)]
    second_backends = [make_backend(f"b{i}", port=9000 + i) for i in range(6)]
    opening = request(conversation("Tell me about rendezvous hashing."))
    served_on = first.choose(opening, first_backends)
    serve(first, accounting, opening, served_on)
    follow_up = request(conversation("Tell me about rendezvous hashing.", "It ranks.", "More?"))
    assert second.choose(follow_up, second_backends).name == served_on.name


def test_rendezvous_bounded_load():
    policy = make_policy(prefix_imbalance=1)
    backends = [make_backend(f"b{i}", slots=8, port=9000 + i) for i in range(4)]
    body = conversation("Where does this conversation go?")
    key = build_prefix(body, "chat", CHUNK, "m").key
    winner = max(backends, key=lambda backend: rendezvous_weight(backend.name, key))
    winner.inflight = 2
    assert policy.choose(request(body), backends) is not winner


# --- policy: holding for a warm slot ---------------------------------------------


def full_warm_setup(**overrides):
    policy = make_policy(**overrides)
    accounting = SlotAccounting()
    a, b = make_backend("a", slots=2), make_backend("b", slots=2)
    serve(policy, accounting, request(conversation("Summarise the design.")), a)
    a.inflight = 2
    turn = request(conversation("Summarise the design.", "It routes by prefix.", "And then?"))
    return policy, accounting, a, b, turn


def test_hold_bounded_by_warm_wait():
    policy, _accounting, _a, b, turn = full_warm_setup(prefix_warm_wait=0.5)
    before = time.monotonic()
    assert policy.choose(turn, [b]) is None
    assert turn.hold_until > before
    assert turn.hold_until <= time.monotonic() + 0.5


def test_hold_keeps_deadline_across_calls():
    policy, _accounting, _a, b, turn = full_warm_setup(prefix_warm_wait=0.5)
    policy.choose(turn, [b])
    first_deadline = turn.hold_until
    policy.choose(turn, [b])
    assert turn.hold_until == first_deadline


def test_hold_ends_with_warm_slot():
    policy, _accounting, a, b, turn = full_warm_setup(prefix_warm_wait=0.5)
    assert policy.choose(turn, [b]) is None
    a.inflight = 1
    assert policy.choose(turn, [a, b]) is a


def test_hold_expires_goes_cold():
    policy, _accounting, _a, b, turn = full_warm_setup(prefix_warm_wait=0.02)
    assert policy.choose(turn, [b]) is None
    time.sleep(0.03)
    assert policy.choose(turn, [b]) is b


def test_hold_bounded_by_prefill_estimate():
    policy = make_policy(prefix_warm_wait=5.0)
    accounting = SlotAccounting()
    a, b = make_backend("a", slots=2), make_backend("b", slots=2)
    opening = request(conversation("Summarise the design. " * 20))
    tokens = build_prefix(opening.body, "chat", CHUNK, "m").chars // 4
    # 1 ms per prompt token: the whole cached prefix saves about tokens ms.
    serve(policy, accounting, opening, a, prompt_ms=1.0 * tokens)
    a.inflight = 2
    turn = request(conversation("Summarise the design. " * 20, "It routes.", "Then?"))
    before = time.monotonic()
    assert policy.choose(turn, [b]) is None
    assert turn.hold_until - before <= tokens / 1000 + 0.01
    assert turn.hold_until - before < 1.0


def test_no_hold_when_saving_negligible():
    policy = make_policy(prefix_warm_wait=5.0)
    accounting = SlotAccounting()
    a, b = make_backend("a", slots=2), make_backend("b", slots=2)
    opening = request(conversation("Summarise the design. " * 20))
    tokens = build_prefix(opening.body, "chat", CHUNK, "m").chars // 4
    # 1 microsecond per token: waiting cannot beat a cold prefill.
    serve(policy, accounting, opening, a, prompt_ms=0.001 * tokens)
    a.inflight = 2
    turn = request(conversation("Summarise the design. " * 20, "It routes.", "Then?"))
    assert policy.choose(turn, [b]) is b


def test_no_hold_when_nothing_warm():
    policy = make_policy(prefix_warm_wait=1.0)
    accounting = SlotAccounting()
    a, b = make_backend("a", slots=2), make_backend("b", slots=2)
    serve(policy, accounting, request(conversation("Summarise the design.")), a)
    a.inflight = 2
    turn = request(conversation("A brand new question?", system="Another assistant."))
    assert policy.choose(turn, [b]) is b
    assert turn.hold_until == 0.0


def test_no_hold_when_warm_backend_overloaded():
    policy, _accounting, a, b, turn = full_warm_setup(prefix_warm_wait=1.0, prefix_imbalance=0)
    assert policy.choose(turn, [b]) is b


def test_no_hold_when_warm_backend_unhealthy():
    policy, _accounting, a, b, turn = full_warm_setup(prefix_warm_wait=1.0)
    a.state = BackendState.UNHEALTHY
    assert policy.choose(turn, [b]) is b


def test_no_hold_when_wait_disabled():
    policy, _accounting, _a, b, turn = full_warm_setup(prefix_warm_wait=0.0)
    assert policy.choose(turn, [b]) is b


# --- policy: learning from results -------------------------------------------------


def test_result_corrects_wrong_prediction():
    metrics = Metrics()
    policy = make_policy(metrics)
    accounting = SlotAccounting()
    a, b = make_backend("a"), make_backend("b")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    assert policy.choose(turn, [a, b]) is a
    serve(policy, accounting, turn, a, cached_tokens=0)
    prefix = turn.data[DATA_KEY]
    assert policy.index.match(prefix.chain, time.monotonic()) == {}
    outcome = metrics.registry.get_sample_value(
        "lcha_prefix_cache_outcomes_total", {"prediction": "warm", "actual": "cold"}
    )
    assert outcome == 1.0


def test_result_confirms_prediction():
    metrics = Metrics()
    policy = make_policy(metrics)
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    policy.choose(turn, [a])
    prefix = turn.data[DATA_KEY]
    serve(policy, accounting, turn, a, cached_tokens=prefix.chars // 4 - 2)
    assert policy.index.match(prefix.chain, time.monotonic()) == {"a": len(prefix.chain)}
    outcome = metrics.registry.get_sample_value(
        "lcha_prefix_cache_outcomes_total", {"prediction": "warm", "actual": "warm"}
    )
    assert outcome == 1.0


def test_result_without_response_stays_pending():
    policy = make_policy()
    accounting = SlotAccounting()
    a = make_backend("a")
    opening = request(conversation("Explain paging in detail."))
    policy.on_dispatch(opening, accounting.acquire(a, "m", "r"))
    prefix = opening.data[DATA_KEY]
    assert policy.index.match(prefix.chain, time.monotonic()) == {}


def test_lookup_metrics_once_per_request():
    metrics = Metrics()
    policy = make_policy(metrics)
    b = make_backend("b")
    turn = request(conversation("A brand new question?"))
    for _ in range(3):
        policy.choose(turn, [b])
    misses = metrics.registry.get_sample_value("lcha_prefix_lookups_total", {"result": "miss"})
    assert misses == 1.0


def test_lookup_metrics_hit():
    metrics = Metrics()
    policy = make_policy(metrics)
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    policy.choose(request(conversation("Explain paging in detail.", "Pages.", "More?")), [a])
    hits = metrics.registry.get_sample_value("lcha_prefix_lookups_total", {"result": "hit"})
    assert hits == 1.0


# --- policy: slots, reloads, replaced backends ---------------------------------------


async def test_pin_slot_from_result():
    policy = make_policy(prefix_pin_slot=True)
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a, slot_id=3)
    body = conversation("Explain paging in detail.", "Pages map memory.", "Go on.")
    lease = accounting.acquire(a, "m", "second")
    policy.on_dispatch(request(body), lease)
    assert lease.slot_id == 3
    # The slot is taken until that lease is released.
    other = accounting.acquire(a, "m", "third")
    policy.on_dispatch(request(body, rid="third"), other)
    assert other.slot_id is None
    await lease.release()
    await other.release()


def test_pin_slot_off_by_default():
    policy = make_policy()
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a, slot_id=3)
    lease = accounting.acquire(a, "m", "second")
    policy.on_dispatch(request(conversation("Explain paging in detail.", "Pages.", "More?")), lease)
    assert lease.slot_id is None


def test_configure_new_chunk_size_clears_index():
    policy = make_policy()
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    policy.configure(RoutingConfig(policy="prefix", prefix_chunk_size=CHUNK * 2))
    assert len(policy.index) == 0


def test_configure_keeps_index():
    policy = make_policy()
    accounting = SlotAccounting()
    a = make_backend("a")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    size = len(policy.index)
    policy.configure(RoutingConfig(policy="prefix", prefix_chunk_size=CHUNK, prefix_imbalance=5))
    assert len(policy.index) == size
    assert policy.imbalance == 5


def test_replaced_backend_forgotten():
    policy = make_policy()
    accounting = SlotAccounting()
    a, b = make_backend("a"), make_backend("b")
    serve(policy, accounting, request(conversation("Explain paging in detail.")), a)
    replacement = make_backend("a", port=9100)
    turn = request(conversation("Explain paging in detail.", "Pages map memory.", "Go on."))
    policy.choose(turn, [replacement, b])
    assert policy.index.match(turn.data[DATA_KEY].chain, time.monotonic()) == {}


# --- with the dispatcher -------------------------------------------------------------


@pytest.fixture
async def dispatch_setup():
    dispatchers = []

    async def build(warm_wait):
        config = Config(
            backends=(
                BackendConfig(name="a", url="http://127.0.0.1:9000", slots=1, models=("m",)),
                BackendConfig(name="b", url="http://127.0.0.1:9001", slots=1, models=("m",)),
            ),
            queue=QueueConfig(max_size=16, timeout=5.0),
            routing=RoutingConfig(
                policy="prefix", prefix_chunk_size=CHUNK, prefix_warm_wait=warm_wait
            ),
        )
        accounting = SlotAccounting()
        registry = BackendRegistry(config, session=None, on_change=lambda: None)
        for backend in registry:
            backend.state = BackendState.HEALTHY
            backend.capacity = 1
        policy = PrefixPolicy(config.routing)
        dispatcher = Dispatcher(
            config, registry, accounting, policy, AffinityTable(600, 1000), Metrics()
        )
        await dispatcher.start()
        dispatchers.append(dispatcher)

        opening = request(conversation("Explain paging in detail."), rid="opening")
        lease = await dispatcher.acquire(opening)
        policy.on_result(opening, lease, {"cached_tokens": 0, "prompt_tokens": 20})
        await lease.release()
        warm = lease.backend
        blocker = accounting.acquire(warm, "m", "blocker")
        return dispatcher, warm, blocker

    yield build
    for dispatcher in dispatchers:
        await dispatcher.stop()


async def test_dispatcher_hold_gets_warm_slot(dispatch_setup):
    dispatcher, warm, blocker = await dispatch_setup(warm_wait=2.0)
    turn = request(conversation("Explain paging in detail.", "Pages.", "More?"), rid="turn")
    waiting = asyncio.create_task(dispatcher.acquire(turn))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await blocker.release()
    lease = await asyncio.wait_for(waiting, 1.0)
    assert lease.backend is warm
    await lease.release()


async def test_dispatcher_hold_does_not_block_others(dispatch_setup):
    dispatcher, warm, blocker = await dispatch_setup(warm_wait=2.0)
    turn = request(conversation("Explain paging in detail.", "Pages.", "More?"), rid="turn")
    waiting = asyncio.create_task(dispatcher.acquire(turn))
    await asyncio.sleep(0.02)
    other = request(conversation("An unrelated question?", system="Different."), rid="other")
    lease = await asyncio.wait_for(dispatcher.acquire(other), 1.0)
    assert lease.backend is not warm
    await blocker.release()
    held_lease = await asyncio.wait_for(waiting, 1.0)
    assert held_lease.backend is warm
    await lease.release()
    await held_lease.release()


async def test_dispatcher_hold_times_out_cold(dispatch_setup):
    dispatcher, warm, blocker = await dispatch_setup(warm_wait=0.1)
    turn = request(conversation("Explain paging in detail.", "Pages.", "More?"), rid="turn")
    started = time.monotonic()
    lease = await asyncio.wait_for(dispatcher.acquire(turn), 2.0)
    waited = time.monotonic() - started
    assert lease.backend is not warm
    assert waited >= 0.09
    assert waited < 1.0
    await lease.release()
    await blocker.release()
