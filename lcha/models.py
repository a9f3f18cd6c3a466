"""Model placement: which router-mode backend loads which model, and when.

A router-mode llama-server (started with --models-dir and no -m) loads a
model on the first request that names it and, at its --models-max, evicts
the least recently used idle model. lcha decides which backend gets a
request that causes a load, so that:

- a request goes where its model is already loaded when it can;
- no load is dispatched to a backend at its `max_models` while a model
  loaded there has requests in flight;
- a model stays preferred on its backend for `routing.model_unload_delay`
  after its last request, so that follow-up requests find it loaded;
- `routing.model_limits` caps the requests per model across all backends.

The queue order (which waiting request goes first) stays in dispatcher.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Backend, BackendRegistry
    from .config import RoutingConfig
    from .dispatcher import PendingRequest
    from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Options:
    """The backends a request can go to now."""

    # Backends with the model loaded (single-model backends always have it)
    # and a free slot for it.
    warm: list[Backend] = field(default_factory=list)
    # Router-mode backends that can load the model now. Only the best kind
    # of load is listed: first no eviction, then the eviction of a model past
    # its unload delay, then the eviction of the model idle the longest.
    loads: list[Backend] = field(default_factory=list)
    # True when the request waits for a load: no backend it may use has its
    # model loaded, and none can load it now.
    needs_load: bool = False


class ModelPlacement:
    """Rank backends for a request by what their routers have loaded."""

    def __init__(
        self,
        routing: RoutingConfig,
        registry: BackendRegistry,
        metrics: Metrics,
        unload: Callable[[Backend, str], None],
    ) -> None:
        self.routing = routing
        self.registry = registry
        self.metrics = metrics
        self._unload = unload

    def configure(self, routing: RoutingConfig) -> None:
        self.routing = routing

    def options(
        self,
        request: PendingRequest,
        eligible: list[Backend],
        barred: set[Backend],
        now: float,
    ) -> Options:
        """Return where `request` can go now.

        `eligible` are the backends that may serve the request at all.
        `barred` backends are kept free for an older request. They take
        nothing, but still count as places where the model is loaded.
        """
        model = request.model
        result = Options()
        if model is not None and self._at_model_limit(model):
            return result

        loaded_somewhere = False
        router_backends = False
        loadable: list[Backend] = []
        for backend in eligible:
            if not backend.router_mode or model is None:
                loaded_somewhere = True
                if backend not in barred and backend.free_slots > 0:
                    result.warm.append(backend)
                continue
            router_backends = True
            if model in backend.unloading:
                # A request now would load the model again.
                continue
            if model in backend.loaded_models:
                loaded_somewhere = True
                if backend not in barred and backend.model_free_slots(model) > 0:
                    result.warm.append(backend)
            elif backend not in barred and self._can_load(backend):
                loadable.append(backend)
        if result.warm:
            return result

        result.loads = self._rank_loads(loadable, loaded_somewhere, now)
        result.needs_load = router_backends and not loaded_somewhere and not result.loads
        return result

    def max_models(self, backend: Backend) -> int | None:
        """Return how many models lcha lets `backend` hold at once, None for no limit.

        The smaller of the configured limit and the router's own
        --models-max: at its own limit the router evicts by itself.
        """
        configured = backend.config.max_models or self.routing.max_models
        limits = [limit for limit in (configured, backend.router_max_models) if limit]
        return min(limits) if limits else None

    def make_room(self, backend: Backend, model: str | None, request_id: str) -> bool:
        """Return whether a request for `model` may go to `backend` now.

        When the router would keep more models than `max_models` because its
        own --models-max is larger, lcha unloads the least recently used idle
        model first and returns False. The request then stays queued until a
        poll shows the model gone. Otherwise the router evicts by itself.
        """
        if not backend.router_mode or model is None or model in backend.loaded_models:
            return True
        limit = self.max_models(backend)
        if limit is None or not self._router_allows_more(backend, limit):
            return True
        victims = self._victims(backend, limit)
        for victim in victims:
            backend.unloading.add(victim)
            self._unload(backend, victim)
        if victims:
            log.info(
                "model unload for a load backend=%s model=%s request_id=%s unloading=%s",
                backend.name,
                model,
                request_id,
                ",".join(victims),
            )
        return not victims

    def record_dispatch(self, backend: Backend, model: str | None, request_id: str) -> None:
        """Track the load that a request dispatched to `backend` causes, if any.

        The load and the eviction it implies are assumed until the next poll
        of the backend shows what the router did.
        """
        if not backend.router_mode or model is None or model in backend.loaded_models:
            return
        limit = self.max_models(backend)
        evicted = self._victims(backend, limit) if limit is not None else []
        for victim in evicted:
            backend.loaded_models.discard(victim)
            backend.pending_loads.pop(victim, None)

        backend.loaded_models.add(model)
        backend.pending_loads[model] = time.monotonic()
        backend.capacity = backend.router_capacity()
        self.metrics.model_loads.labels(backend.name, model).inc()
        log.info(
            "model load backend=%s model=%s request_id=%s evicting=%s loaded=%s",
            backend.name,
            model,
            request_id,
            ",".join(evicted) or "-",
            ",".join(sorted(backend.loaded_models)),
        )

    # --- helpers ---------------------------------------------------------------

    def _at_model_limit(self, model: str) -> bool:
        limit = self.routing.model_limits.get(model)
        if limit is None:
            return False
        in_flight = sum(b.model_inflight.get(model, 0) for b in self.registry.all_with_retired())
        return in_flight >= limit

    def _has_room(self, backend: Backend) -> bool:
        limit = self.max_models(backend)
        return limit is None or len(backend.loaded_models) < limit

    def _can_load(self, backend: Backend) -> bool:
        if backend.unloading:
            # Room is being made for an earlier load; it goes first.
            return False
        if self._has_room(backend):
            return True
        # At the limit the load evicts a model, and only an idle one may go.
        # Sent anyway, the request would wait inside the router, which sends
        # nothing meanwhile and lets new requests for the busy model pass it
        # without bound. In lcha's queue it keeps its place and skip count.
        return all(backend.model_busy(model) == 0 for model in backend.loaded_models)

    def _rank_loads(
        self, loadable: list[Backend], loaded_somewhere: bool, now: float
    ) -> list[Backend]:
        room = [b for b in loadable if self._has_room(b)]
        if room:
            return room
        unreserved = [b for b in loadable if not self._holds_reserved(b, now)]
        if unreserved:
            return unreserved
        if loaded_somewhere or not loadable:
            # The model is loaded elsewhere: wait for its slots there rather
            # than evict a model that may get follow-up requests.
            return []
        # Every candidate would evict a model inside its unload delay, and
        # waiting would leave the request without any backend: evict the
        # model that has been idle the longest.
        return [min(loadable, key=self._last_use)]

    def _holds_reserved(self, backend: Backend, now: float) -> bool:
        delay = self.routing.model_unload_delay
        for model in backend.loaded_models:
            if backend.model_busy(model) > 0:
                return True
            last_used = backend.model_last_used.get(model)
            if last_used is not None and now - last_used < delay:
                return True
        return False

    def _victims(self, backend: Backend, limit: int) -> list[str]:
        """Return the idle models, least recently used first, that a load must evict."""
        excess = len(backend.loaded_models) + 1 - limit
        if excess <= 0:
            return []
        idle = [m for m in backend.loaded_models if backend.model_busy(m) == 0]
        idle.sort(key=lambda m: backend.model_last_used.get(m, 0.0))
        return idle[:excess]

    def _router_allows_more(self, backend: Backend, limit: int) -> bool:
        router_limit = backend.router_max_models
        return router_limit is not None and (router_limit == 0 or router_limit > limit)

    @staticmethod
    def _last_use(backend: Backend) -> float:
        return max((backend.model_last_used.get(m, 0.0) for m in backend.loaded_models), default=0.0)
