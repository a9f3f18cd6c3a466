"""Routing policies: pick one backend among those that can take a request now.

The dispatcher builds the candidate list: backends that are healthy, serve
the model, have a free slot and were not excluded by an earlier failed try. A
policy only ranks it. Session affinity runs before least_busy and round_robin
and wins when its backend is a candidate; the prefix policy tracks
conversations itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .config import RoutingConfig

if TYPE_CHECKING:
    from .backends import Backend
    from .dispatcher import PendingRequest
    from .metrics import Metrics
    from .slots import Lease


class Policy(Protocol):
    name: str

    def choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        """Return the backend to use, or None to keep the request queued."""

    def on_dispatch(self, request: PendingRequest, lease: Lease) -> None:
        """Record that `request` was sent to `lease.backend`."""

    def on_result(self, request: PendingRequest, lease: Lease, info: dict) -> None:
        """Learn from a finished response (`timings`, `usage`)."""


class RoundRobin:
    """Rotate over candidates, with one position per model."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str | None, int] = {}

    def choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        if not candidates:
            return None
        position = self._counters.get(request.model, 0)
        self._counters[request.model] = position + 1
        return candidates[position % len(candidates)]

    def on_dispatch(self, request: PendingRequest, lease: Lease) -> None:
        pass

    def on_result(self, request: PendingRequest, lease: Lease, info: dict) -> None:
        pass


class LeastBusy:
    """Most free slots wins; ties rotate so equal backends share the load."""

    name = "least_busy"

    def __init__(self) -> None:
        self._tie_breaker = 0

    def choose(self, request: PendingRequest, candidates: list[Backend]) -> Backend | None:
        if not candidates:
            return None
        best_free = max(b.free_slots for b in candidates)
        best = [b for b in candidates if b.free_slots == best_free]
        if len(best) == 1:
            return best[0]
        self._tie_breaker += 1
        return best[self._tie_breaker % len(best)]

    def on_dispatch(self, request: PendingRequest, lease: Lease) -> None:
        pass

    def on_result(self, request: PendingRequest, lease: Lease, info: dict) -> None:
        pass


def make_policy(config: RoutingConfig, metrics: Metrics | None = None) -> Policy:
    if config.policy == "round_robin":
        return RoundRobin()
    if config.policy == "prefix":
        from .prefix import PrefixPolicy

        return PrefixPolicy(config, metrics)
    return LeastBusy()
