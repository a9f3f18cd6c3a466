"""`create_app(config)`: wire the registry, dispatcher, proxy and metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from . import errors
from .affinity import AffinityTable
from .backends import Backend, BackendRegistry, BackendState
from .config import Config
from .dispatcher import Dispatcher
from .forward import MODEL_ROUTES, SLOT_ROUTES, Proxy
from .header_timeout import HeaderTimeoutRunner
from .metrics import Metrics
from .policies import make_policy
from .slots import SlotAccounting

log = logging.getLogger(__name__)

# Paths served without an API key, because probes and scrapers send none.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


class State:
    """The state of one lcha application; no module keeps state of its own."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.accounting = SlotAccounting()
        self.affinity = AffinityTable(
            config.routing.affinity_ttl, config.routing.affinity_max_entries
        )
        self.policy = make_policy(config.routing, self.metrics)
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]
        self.registry: BackendRegistry = None  # type: ignore[assignment]
        self.dispatcher: Dispatcher = None  # type: ignore[assignment]
        self.proxy = Proxy(self)
        self.draining = False
        self.started_at = time.time()
        # Handler tasks in flight, so a drain can wait for them or end them.
        self.active: set[asyncio.Task[Any]] = set()
        self.api_keys = _encode_keys(config.api_keys)
        self._gauge_names: set[str] = set()

    async def start(self) -> None:
        self.session = _make_session(self.config)
        self.registry = BackendRegistry(
            self.config, self.session, on_change=self._on_backends_changed, on_state=self._on_state
        )
        self.dispatcher = Dispatcher(
            self.config, self.registry, self.accounting, self.policy, self.affinity, self.metrics
        )
        for backend in self.registry:
            self.metrics.set_backend_state(backend.name, backend.state)
        await self.dispatcher.start()
        await self.registry.start()
        log.info(
            "lcha started listen=%s backends=%d policy=%s",
            self.config.listen,
            len(self.registry),
            self.config.routing.policy,
        )

    async def stop(self) -> None:
        await self.registry.stop()
        await self.dispatcher.stop()
        await self.session.close()
        log.info("lcha stopped")

    def reload(self, config: Config) -> None:
        """Apply a new configuration; running requests keep their leases."""
        old = self.config
        if (config.listen_host, config.listen_port) != (old.listen_host, old.listen_port):
            log.warning(
                "listen address change needs a restart listen=%s requested=%s",
                old.listen,
                config.listen,
            )
            config = config.replace(listen_host=old.listen_host, listen_port=old.listen_port)
        self.config = config
        self.api_keys = _encode_keys(config.api_keys)
        policy = None
        if config.routing.policy != old.routing.policy:
            policy = self.policy = make_policy(config.routing, self.metrics)
        elif hasattr(self.policy, "configure"):
            self.policy.configure(config.routing)  # type: ignore[attr-defined]
        self.affinity.configure(config.routing.affinity_ttl, config.routing.affinity_max_entries)
        self.dispatcher.configure(config, policy)
        self.registry.reconfigure(config)

    def summary(self) -> dict[str, Any]:
        states = {state.value: 0 for state in BackendState}
        total = busy = 0
        backends = []
        # Backends removed by a reload show as draining until their last
        # request ends.
        self.registry.prune_retired()
        for backend in self.registry.all_with_retired():
            states[backend.state.value] += 1
            if backend.available:
                total += backend.capacity
                busy += min(backend.busy, backend.capacity)
            backends.append(
                {
                    "name": backend.name,
                    "state": backend.state.value,
                    "slots": backend.capacity,
                    "busy": backend.inflight,
                    "external_busy": backend.external_busy,
                    "models": sorted(backend.models),
                    "error": backend.last_error or None,
                }
            )
        if self.draining:
            status = "draining"
        elif states["healthy"]:
            status = "ok"
        else:
            status = "no_healthy_backend"
        return {
            "status": status,
            "backends": states,
            "slots": {"total": total, "busy": busy, "free": max(total - busy, 0)},
            "queue": len(self.dispatcher),
            "detail": backends,
        }

    def status_line(self) -> str:
        summary = self.summary()
        slots = summary["slots"]
        return (
            f"{summary['backends']['healthy']}/{len(self.registry)} backends healthy, "
            f"{slots['busy']}/{slots['total']} slots busy, {summary['queue']} queued"
        )

    def refresh_gauges(self) -> None:
        metrics = self.metrics
        # Without this, a removed backend whose last request has ended would
        # read as draining until the next reload.
        self.registry.prune_retired()
        seen: set[str] = set()
        for backend in self.registry.all_with_retired():
            if backend.name in seen:
                continue
            seen.add(backend.name)
            metrics.backend_slots.labels(backend.name).set(backend.capacity)
            metrics.backend_slots_busy.labels(backend.name).set(backend.inflight)
            metrics.set_backend_state(backend.name, backend.state)
            if backend.router_mode:
                metrics.backend_models_loaded.labels(backend.name).set(len(backend.loaded_models))
        # A removed backend keeps its series (no gaps in graphs) but reads 0.
        for name in self._gauge_names - seen:
            metrics.backend_slots.labels(name).set(0)
            metrics.backend_slots_busy.labels(name).set(0)
            metrics.set_backend_state(name, "")
        self._gauge_names |= seen
        metrics.queue_length.set(len(self.dispatcher))

    def _on_backends_changed(self) -> None:
        # Called from synchronous code; the notify needs the condition's lock.
        asyncio.get_running_loop().create_task(self.accounting.notify())

    def _on_state(self, backend: Backend, old: BackendState, new: BackendState) -> None:
        self.metrics.set_backend_state(backend.name, new)
        if new is BackendState.LOADING and hasattr(self.policy, "forget_backend"):
            # A backend that loads its model again has restarted with empty caches.
            self.policy.forget_backend(backend.name)


STATE = web.AppKey("lcha_state", State)


def make_runner(app: web.Application) -> web.AppRunner:
    """Return the runner with lcha's production settings; tests use it too.

    handler_cancellation: a client that disconnects cancels its handler, so
    the upstream request is closed and the slot freed even during prefill,
    when nothing is being written that could notice the disconnect.
    Request headers must arrive within timeouts.client_read of their first
    byte (aiohttp has no such limit); the body has the same limit in forward.py.
    """
    state = app[STATE]

    def count_header_timeout() -> None:
        state.metrics.rejections.labels("bad_request").inc()

    return HeaderTimeoutRunner(
        app,
        timeout_of=lambda: state.config.timeouts.client_read,
        on_timeout=count_header_timeout,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=75.0,
        shutdown_timeout=5.0,
    )


def create_app(config: Config) -> web.Application:
    """Build the aiohttp application for `config`; it starts on app startup."""
    state = State(config)
    # Bodies are read by the proxy with its own, reloadable limit.
    app = web.Application(
        client_max_size=2**63 - 1,
        middlewares=[_track_middleware, _drain_middleware, _auth_middleware],
        handler_args={"max_field_size": 65536, "max_line_size": 65536},
    )
    app[STATE] = state
    app.cleanup_ctx.append(_lifecycle)

    proxy = state.proxy
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/models", _models)
    for path in SLOT_ROUTES:
        app.router.add_post(path, proxy.handle_slot_route)
    for path in MODEL_ROUTES:
        app.router.add_post(path, proxy.handle_model_route)
    app.router.add_route("*", "/{tail:.*}", proxy.handle_other)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.start()
    yield
    await state.stop()


# --- middlewares -----------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _track_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    task = asyncio.current_task()
    if task is None or request.path in PUBLIC_PATHS:
        return await handler(request)
    state.active.add(task)
    try:
        return await handler(request)
    finally:
        state.active.discard(task)


@web.middleware
async def _drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if state.draining and request.path not in PUBLIC_PATHS:
        state.metrics.rejections.labels("draining").inc()
        state.proxy.record_local(request, 503, "draining")
        return errors.error_response(
            503,
            "lcha is shutting down and accepts no new requests; retry on another instance",
            "service_unavailable_error",
            "draining",
            headers={"Connection": "close", "Retry-After": "5"},
        )
    return await handler(request)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.api_keys or request.path in PUBLIC_PATHS:
        return await handler(request)
    presented = _presented_key(request)
    if presented is None or not _key_matches(presented, state.api_keys):
        state.metrics.rejections.labels("unauthorized").inc()
        state.proxy.record_local(request, 401, "invalid_api_key")
        message = (
            "Missing API key: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'"
            if presented is None
            else "Invalid API key"
        )
        return errors.error_response(
            401,
            message,
            "authentication_error",
            "invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="lcha"'},
        )
    return await handler(request)


def _presented_key(request: web.Request) -> bytes | None:
    authorization = request.headers.get("Authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("utf-8", "surrogateescape")
    api_key = request.headers.get("X-Api-Key")
    if api_key:
        return api_key.strip().encode("utf-8", "surrogateescape")
    return None


def _key_matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key so the time taken does not reveal which one
    # (or whether any) shares a prefix with the presented key.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


def _encode_keys(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(k.encode("utf-8", "surrogateescape") for k in keys)


# --- lcha's own routes -------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    summary = state.summary()
    status = 200 if summary["status"] == "ok" else 503
    return web.json_response(summary, status=status)


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.refresh_gauges()
    return web.Response(body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type})


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    entries: dict[str, dict[str, Any]] = {}
    for backend in state.registry:
        if not backend.available:
            continue
        for model in sorted(backend.models):
            entry = entries.get(model)
            if entry is None:
                entry = entries[model] = {
                    "id": model,
                    "object": "model",
                    "created": int(state.started_at),
                    "owned_by": "llamacpp",
                    "backends": [],
                }
            entry["backends"].append(backend.name)
    state.proxy.record_local(request, 200, "ok")
    return web.json_response({"object": "list", "data": list(entries.values())})


def _make_session(config: Config) -> aiohttp.ClientSession:
    # No total timeout: a generation may run for many minutes; forward.py
    # applies timeouts.connect, first_byte and idle itself. No pool limit:
    # the slot accounting already bounds connections per backend.
    # Pooled connections save a connect per request, but llama-server
    # (11434.0.0) may close one at any moment. It drops idle connections after
    # 5 s. When its -np + 4 fixed HTTP threads are busy, it serves a request on
    # a throwaway thread and closes the connection afterwards. So
    # keepalive_timeout stays under the 5 s, and forward.py resends once on a
    # connection that died before any response byte.
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=4.0, use_dns_cache=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect),
        auto_decompress=False,
        trust_env=False,
        read_bufsize=256 * 1024,
        json_serialize=json.dumps,
    )
