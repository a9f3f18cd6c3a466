"""Slot leases: who holds a slot on which backend, released exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .backends import Backend

log = logging.getLogger(__name__)


class Lease:
    """One request's hold on one slot of one backend process.

    The lease keeps a reference to the `Backend` object it was taken from, so
    releasing it always decrements the count it incremented, even after the
    backend was removed, re-added or restarted in the meantime.
    """

    __slots__ = ("backend", "model", "request_id", "acquired_at", "slot_id", "_accounting", "_released")

    def __init__(
        self,
        accounting: SlotAccounting,
        backend: Backend,
        model: str | None,
        request_id: str,
    ) -> None:
        self._accounting = accounting
        self.backend = backend
        self.model = model
        self.request_id = request_id
        self.acquired_at = time.monotonic()
        # Slot to pin with llama-server's id_slot, when a policy chose one.
        self.slot_id: int | None = None
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    async def release(self) -> None:
        """Return the slot and wake the dispatcher; later calls do nothing."""
        if self._released:
            return
        self._released = True
        # The count changes before the first await, so a cancellation that
        # lands on the await below cannot leak the slot.
        self._accounting.give_back(self)
        await self._accounting.notify()


class SlotAccounting:
    """Per-backend lease counts behind one `asyncio.Condition`.

    The dispatcher waits on `condition`; every event that can make a queued
    request dispatchable (a release, an enqueue, a backend change) notifies it.
    """

    def __init__(self) -> None:
        self.condition = asyncio.Condition()
        self.on_release: Callable[[Lease], None] | None = None

    def acquire(self, backend: Backend, model: str | None, request_id: str) -> Lease:
        backend.inflight += 1
        backend.acquired_total += 1
        if model is not None:
            backend.model_inflight[model] = backend.model_inflight.get(model, 0) + 1
        return Lease(self, backend, model, request_id)

    def give_back(self, lease: Lease) -> None:
        backend = lease.backend
        backend.inflight -= 1
        if backend.inflight < 0:
            # Would mean a double release slipped past Lease; keep serving.
            log.error(
                "slot count below zero backend=%s request_id=%s",
                backend.name,
                lease.request_id,
            )
            backend.inflight = 0
        model = lease.model
        if model is not None:
            left = backend.model_inflight.get(model, 1) - 1
            if left > 0:
                backend.model_inflight[model] = left
            else:
                backend.model_inflight.pop(model, None)
                backend.model_last_used[model] = time.monotonic()
        if self.on_release is not None:
            self.on_release(lease)

    async def notify(self) -> None:
        # The dispatcher holds the lock only while it runs synchronously, so
        # this acquire does not suspend in practice.
        async with self.condition:
            self.condition.notify_all()
