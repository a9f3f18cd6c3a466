"""The global request queue and the dispatcher that moves requests onto slots.

Requests wait in one queue, kept as one FIFO per model so that a model whose
backends are full never blocks a request for another model. The dispatcher
task sleeps on the slot accounting's condition and wakes only on events: a
request enqueued, a lease released, a backend changed state or capacity.

On router-mode backends a request may wait for a model load (see models.py).
Younger requests whose model is loaded may pass it, each one counting as a
skip, until it has been skipped `routing.max_queue_skip` times; from then on
the backends it could load on take no younger request until it is served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .backends import Backend, BackendRegistry
from .models import ModelPlacement
from .slots import Lease, SlotAccounting

if TYPE_CHECKING:
    from .affinity import AffinityTable
    from .config import Config
    from .metrics import Metrics
    from .policies import Policy

log = logging.getLogger(__name__)

# How far the dispatcher looks past held or blocked requests of one model.
MAX_SCAN_PER_MODEL = 64


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class NoBackend(Exception):
    pass


class PendingRequest:
    """A request waiting for, or holding, a slot."""

    __slots__ = (
        "seq",
        "request_id",
        "model",
        "route",
        "body",
        "hashes",
        "future",
        "arrived_at",
        "exclude",
        "skips",
        "hold_until",
        "needs_load",
        "data",
    )

    def __init__(
        self,
        request_id: str,
        model: str | None,
        route: str,
        body: dict[str, Any] | None = None,
        hashes: list[bytes] | None = None,
    ) -> None:
        self.seq = 0
        self.request_id = request_id
        self.model = model
        self.route = route
        self.body = body
        self.hashes = hashes or []
        self.future: asyncio.Future[Lease] | None = None
        self.arrived_at = time.monotonic()
        self.exclude: set[Backend] = set()
        # Times a younger request took a backend this one waits to load on.
        self.skips = 0
        # A policy may keep a request queued until this time for a warm slot.
        self.hold_until = 0.0
        # Set by each dispatch try: the request waits for a model load.
        self.needs_load = False
        # Free space for policies (for example the prefix index's chain).
        self.data: dict[str, Any] = {}


class Dispatcher:
    """Owns the queue and the task that assigns queued requests to slots."""

    def __init__(
        self,
        config: Config,
        registry: BackendRegistry,
        accounting: SlotAccounting,
        policy: Policy,
        affinity: AffinityTable,
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.accounting = accounting
        self.policy = policy
        self.affinity = affinity
        self.metrics = metrics
        self.max_size = config.queue.max_size
        self.timeout = config.queue.timeout
        self.routing = config.routing
        self.placement = ModelPlacement(config.routing, registry, metrics, registry.unload_model)
        self._queues: dict[str | None, OrderedDict[int, PendingRequest]] = {}
        self._size = 0
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        # Whether the last dispatch round left a request waiting for a load.
        self._load_waiting = False
        self.decisions = 0
        self.decision_seconds = 0.0

    def __len__(self) -> int:
        return self._size

    def configure(self, config: Config, policy: Policy | None = None) -> None:
        self.max_size = config.queue.max_size
        self.timeout = config.queue.timeout
        self.routing = config.routing
        self.placement.configure(config.routing)
        if policy is not None:
            self.policy = policy

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lcha-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- admission -------------------------------------------------------------

    def check_routable(self, request: PendingRequest) -> None:
        """Raise `NoBackend` unless some healthy backend could serve `request`."""
        for backend in self.registry:
            if self._eligible(backend, request):
                return
        raise NoBackend(request.model)

    async def acquire(self, request: PendingRequest, timeout: float | None = None) -> Lease:
        """Wait in the queue until `request` has a slot.

        Raises `QueueFull` at once when the queue is full and `QueueTimeout`
        after `timeout` (default: queue.timeout from arrival). A cancelled
        caller is removed from the queue; a lease that was granted in the same
        loop iteration as the cancellation is released before re-raising.
        """
        if timeout is None:
            timeout = self.timeout - (time.monotonic() - request.arrived_at)

        queue = self._queues.get(request.model)
        if not queue and request.seq == 0 and not self._load_waiting:
            # No request waits ahead of this one for its model: try a slot now
            # and skip two event-loop round trips through the dispatcher task.
            # While a request waits for a model load, passing it counts as a
            # skip, so then every request goes through the queue.
            lease = self._try_dispatch(request, time.monotonic())
            if lease is not None:
                return lease

        if self._size >= self.max_size and request.seq == 0:
            raise QueueFull()

        loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        self._push(request)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                # notify() may wait for the condition's lock. A disconnect that
                # cancels it there must withdraw the request as below, or the
                # dispatcher would later grant a lease that no handler releases.
                await self.accounting.notify()
                # The shield keeps a timeout or disconnect from cancelling the
                # future itself: the dispatcher may have resolved it in the same
                # iteration, and then the lease must be released, not lost.
                return await asyncio.shield(request.future)
        except TimeoutError:
            lease = self._withdraw(request)
            if lease is not None:
                return lease
            raise QueueTimeout() from None
        except asyncio.CancelledError:
            lease = self._withdraw(request)
            if lease is not None:
                await lease.release()
            raise

    def requeue(self, request: PendingRequest, failed: Backend) -> None:
        """Prepare `request` for one more try on a backend other than `failed`."""
        request.exclude.add(failed)
        request.future = None

    # --- queue -----------------------------------------------------------------

    def _push(self, request: PendingRequest) -> None:
        queue = self._queues.get(request.model)
        if queue is None:
            queue = self._queues[request.model] = OrderedDict()
        if request.seq == 0:
            request.seq = next(self._seq)
            queue[request.seq] = request
        else:
            # A retry keeps its place at the front of its model's line.
            queue[request.seq] = request
            queue.move_to_end(request.seq, last=False)
        self._size += 1
        self.metrics.queue_length.set(self._size)

    def _remove(self, request: PendingRequest) -> bool:
        queue = self._queues.get(request.model)
        if queue is None or queue.pop(request.seq, None) is None:
            return False
        if not queue:
            del self._queues[request.model]
        self._size -= 1
        self.metrics.queue_length.set(self._size)
        return True

    def _withdraw(self, request: PendingRequest) -> Lease | None:
        future = request.future
        if future is not None and future.done() and not future.cancelled():
            return future.result()
        self._remove(request)
        if future is not None and not future.done():
            future.cancel()
        return None

    # --- dispatching -----------------------------------------------------------

    async def _run(self) -> None:
        condition = self.accounting.condition
        async with condition:
            while True:
                try:
                    wake_at = self._dispatch_all()
                except Exception:
                    log.exception("dispatch round failed")
                    wake_at = time.monotonic() + 0.1
                if wake_at is None:
                    await condition.wait()
                    continue
                try:
                    async with asyncio.timeout(max(wake_at - time.monotonic(), 0.001)):
                        await condition.wait()
                except TimeoutError:
                    pass

    def _dispatch_all(self) -> float | None:
        """Dispatch every queued request that can go now, oldest first.

        Returns when the dispatcher must look again even without an event (a
        request held for a warm slot), or None.
        """
        if not self._size:
            self._load_waiting = False
            return None
        now = time.monotonic()
        wake_at: float | None = None
        # Older requests waiting for a model load, with the backends they
        # could load on; and the backends kept for those skipped enough.
        load_waiters: list[tuple[PendingRequest, list[Backend]]] = []
        barred: set[Backend] = set()
        # Kinds of request (route, excluded backends) found blocked in this
        # round, per model. A later request of the same kind is blocked too.
        # One of another kind may fit a backend that the blocked one cannot
        # use: an embeddings request waiting for the one backend with
        # --embeddings must not hold up the chat requests behind it.
        blocked: dict[str | None, set[tuple[str, frozenset[Backend]]]] = {}
        heads = [(next(iter(q)), model) for model, q in self._queues.items() if q]
        heapq.heapify(heads)
        while heads:
            _seq, model = heapq.heappop(heads)
            queue = self._queues.get(model)
            if not queue:
                continue
            blocked_kinds = blocked.setdefault(model, set())
            progressed = False
            for request in list(itertools.islice(queue.values(), MAX_SCAN_PER_MODEL)):
                if request.future is None or request.future.done():
                    self._remove(request)
                    continue
                kind = (request.route, frozenset(request.exclude))
                if kind in blocked_kinds:
                    continue
                lease = self._try_dispatch(request, now, barred)
                if lease is not None:
                    self._remove(request)
                    request.future.set_result(lease)
                    self._count_skips(lease.backend, load_waiters, barred)
                    progressed = True
                    break
                if request.hold_until > now:
                    # Held for a warm slot: let the next one of this model try.
                    wake_at = request.hold_until if wake_at is None else min(wake_at, request.hold_until)
                    continue
                if request.needs_load:
                    self._wait_for_load(request, load_waiters, barred)
                blocked_kinds.add(kind)
            if progressed and queue:
                heapq.heappush(heads, (next(iter(queue)), model))
        self._load_waiting = bool(load_waiters)
        return wake_at

    def _wait_for_load(
        self,
        request: PendingRequest,
        load_waiters: list[tuple[PendingRequest, list[Backend]]],
        barred: set[Backend],
    ) -> None:
        backends = [b for b in self.registry if b.router_mode and self._eligible(b, request)]
        load_waiters.append((request, backends))
        if request.skips >= self.routing.max_queue_skip:
            # Skipped enough: every backend this request could load on drains
            # and takes it as soon as its loaded models are idle.
            barred.update(backends)

    def _count_skips(
        self,
        backend: Backend,
        load_waiters: list[tuple[PendingRequest, list[Backend]]],
        barred: set[Backend],
    ) -> None:
        # The heap hands out requests oldest first, so every waiter listed
        # is older than the request just dispatched to `backend`.
        for waiter, backends in load_waiters:
            if backend not in backends:
                continue
            waiter.skips += 1
            self.metrics.queue_skips.labels(waiter.model or "").inc()
            if waiter.skips >= self.routing.max_queue_skip:
                barred.update(backends)

    def _try_dispatch(
        self, request: PendingRequest, now: float, barred: set[Backend] | None = None
    ) -> Lease | None:
        started = time.perf_counter()
        eligible = [b for b in self.registry if self._eligible(b, request)]
        options = self.placement.options(request, eligible, barred or set(), now)
        request.needs_load = options.needs_load
        # A loaded model wins over a load. When a policy keeps the request
        # queued for a warm slot, no load happens in its place.
        candidates = options.warm or options.loads
        backend = self._choose(request, candidates) if candidates else None
        if (
            backend is not None
            and not options.warm
            and not self.placement.make_room(backend, request.model, request.request_id)
        ):
            request.needs_load = True
            backend = None
        self.decisions += 1
        self.decision_seconds += time.perf_counter() - started
        if backend is None:
            return None

        lease = self.accounting.acquire(backend, request.model, request.request_id)
        self.placement.record_dispatch(backend, request.model, request.request_id)
        if not getattr(self.policy, "handles_affinity", False):
            self.affinity.remember(request.hashes, backend.name)
        self.policy.on_dispatch(request, lease)
        model_label = request.model or ""
        self.metrics.dispatches.labels(backend.name, model_label).inc()
        self.metrics.queue_wait.labels(model_label).observe(now - request.arrived_at)
        return lease

    def _choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        # The prefix policy tracks conversations itself and within a load
        # bound, which a plain affinity lookup would bypass.
        if getattr(self.policy, "handles_affinity", False):
            return self.policy.choose(request, candidates)
        preferred_name = self.affinity.lookup(request.hashes) if request.hashes else None
        if preferred_name is not None:
            for candidate in candidates:
                if candidate.name == preferred_name:
                    return candidate
        return self.policy.choose(request, candidates)

    def _eligible(self, backend: Backend, request: PendingRequest) -> bool:
        return (
            backend.available
            and backend.serves(request.model)
            and backend not in request.exclude
            and backend.supports(request.route)
        )
