"""Backends: one llama-server process each, its state and its health poller."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiohttp
from yarl import URL

from .config import BackendConfig, Config, HealthConfig

log = logging.getLogger(__name__)


class BackendState(enum.StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class Backend:
    """One llama-server process as lcha sees it.

    A `Backend` object lives as long as its configuration entry. Leases point at
    the object, not at the name, so a backend removed by a reload and re-added
    with the same name starts with a clean count while the old object drains.
    """

    __slots__ = (
        "config",
        "name",
        "url",
        "state",
        "removed",
        "capacity",
        "discovered_slots",
        "inflight",
        "external_busy",
        "models",
        "router_mode",
        "loaded_models",
        "model_inflight",
        "model_last_used",
        "acquired_total",
        "successes",
        "failures",
        "last_error",
        "checked",
        "unsupported",
        "_error_repeats",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.url = URL(config.url)
        self.state = BackendState.UNHEALTHY
        self.removed = False
        self.discovered_slots: int | None = None
        self.capacity = config.slots or 1
        self.inflight = 0
        self.external_busy = 0
        self.models: frozenset[str] = frozenset(config.models or ())
        self.router_mode = False
        # Router mode: models the backend reports as loaded or loading.
        self.loaded_models: set[str] = set()
        self.model_inflight: dict[str, int] = {}
        self.model_last_used: dict[str, float] = {}
        self.acquired_total = 0
        self.successes = 0
        self.failures = 0
        self.last_error = ""
        # False until the first poll finished, so start-up readiness can wait on it.
        self.checked = False
        # Route name -> monotonic time until which the backend is known not to
        # serve it (llama-server answers 501 to /v1/embeddings without --embeddings).
        self.unsupported: dict[str, float] = {}
        self._error_repeats = 0

    def __repr__(self) -> str:
        return (
            f"<Backend {self.name} {self.state} busy={self.inflight}+{self.external_busy}"
            f"/{self.capacity}>"
        )

    @property
    def available(self) -> bool:
        return self.state is BackendState.HEALTHY and not self.removed

    @property
    def free_slots(self) -> int:
        return self.capacity - self.inflight - self.external_busy

    @property
    def busy(self) -> int:
        return self.inflight + self.external_busy

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.models

    def supports(self, route: str) -> bool:
        until = self.unsupported.get(route)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self.unsupported[route]
            return True
        return False

    def mark_unsupported(self, route: str, seconds: float = 60.0) -> None:
        self.unsupported[route] = time.monotonic() + seconds


class BackendRegistry:
    """All configured backends and their health pollers."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        on_change: Callable[[], None],
        on_state: Callable[[Backend, BackendState, BackendState], None] | None = None,
    ) -> None:
        self._session = session
        self._on_change = on_change
        self._on_state = on_state
        self._health = config.health
        self._backends: dict[str, Backend] = {}
        # Backends removed by a reload that still have requests in flight.
        self._retired: list[Backend] = []
        self._tasks: dict[Backend, asyncio.Task[None]] = {}
        self._wakeups: dict[Backend, asyncio.Event] = {}
        for backend_config in config.backends:
            self._backends[backend_config.name] = Backend(backend_config)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, name: str) -> Backend | None:
        return self._backends.get(name)

    def all_with_retired(self) -> Iterable[Backend]:
        yield from self._backends.values()
        yield from self._retired

    def known_models(self) -> set[str]:
        models: set[str] = set()
        for backend in self._backends.values():
            models.update(backend.models)
        return models

    def available_models(self) -> set[str]:
        models: set[str] = set()
        for backend in self._backends.values():
            if backend.available:
                models.update(backend.models)
        return models

    async def start(self) -> None:
        for backend in self._backends.values():
            self._start_poller(backend)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._wakeups.clear()

    async def wait_checked(self, timeout: float) -> None:
        """Wait until every backend has been polled once, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b.checked for b in self._backends.values()):
                return
            await asyncio.sleep(0.05)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration without touching running requests."""
        self._health = config.health
        wanted = {b.name: b for b in config.backends}

        for name, backend in list(self._backends.items()):
            new_config = wanted.get(name)
            if new_config is not None and new_config.url == backend.config.url:
                continue
            # Removed, or moved to another URL: drain the old object and, if the
            # name stays, start a fresh one so old leases cannot touch its count.
            del self._backends[name]
            self._retire(backend)

        for name, backend_config in wanted.items():
            backend = self._backends.get(name)
            if backend is None:
                backend = Backend(backend_config)
                self._backends[name] = backend
                self._start_poller(backend)
                log.info("backend added backend=%s url=%s", name, backend_config.url)
                continue
            if backend.config != backend_config:
                self._apply_config(backend, backend_config)

        # Keep the configured order, which round robin and logs follow.
        self._backends = {name: self._backends[name] for name in wanted}
        self.prune_retired()
        self._on_change()

    def prune_retired(self) -> None:
        self._retired = [b for b in self._retired if b.inflight > 0]

    def wake(self, backend: Backend) -> None:
        """Poll `backend` now instead of at the next interval."""
        event = self._wakeups.get(backend)
        if event is not None:
            event.set()

    def report_failure(self, backend: Backend, error: str) -> None:
        """Take `backend` out of rotation after a refused or failed connection.

        Forwarding saw the failure first; waiting `fall` polls would send more
        requests into a dead process.
        """
        if backend.removed or backend.state is BackendState.UNHEALTHY:
            return
        backend.successes = 0
        backend.failures = self._health.fall
        self._set_state(backend, BackendState.UNHEALTHY, error)
        self.wake(backend)

    # --- polling -------------------------------------------------------------

    def _start_poller(self, backend: Backend) -> None:
        self._wakeups[backend] = asyncio.Event()
        self._tasks[backend] = asyncio.get_running_loop().create_task(
            self._poll_loop(backend), name=f"lcha-poll-{backend.name}"
        )

    def _retire(self, backend: Backend) -> None:
        backend.removed = True
        task = self._tasks.pop(backend, None)
        if task is not None:
            task.cancel()
        self._wakeups.pop(backend, None)
        old_state = backend.state
        backend.state = BackendState.DRAINING
        if self._on_state is not None:
            self._on_state(backend, old_state, BackendState.DRAINING)
        if backend.inflight:
            self._retired.append(backend)
        log.info(
            "backend removed backend=%s url=%s in_flight=%d",
            backend.name,
            backend.config.url,
            backend.inflight,
        )

    def _apply_config(self, backend: Backend, new: BackendConfig) -> None:
        backend.config = new
        if new.slots is not None:
            backend.capacity = new.slots
        elif backend.discovered_slots is not None:
            backend.capacity = backend.discovered_slots
        if new.models is not None:
            backend.models = frozenset(new.models)
        log.info(
            "backend changed backend=%s slots=%d models=%s",
            backend.name,
            backend.capacity,
            ",".join(sorted(backend.models)) or "-",
        )

    async def _poll_loop(self, backend: Backend) -> None:
        wakeup = self._wakeups[backend]
        while True:
            try:
                await self._poll_once(backend)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health poll crashed backend=%s", backend.name)
            backend.checked = True
            try:
                async with asyncio.timeout(self._health.interval):
                    await wakeup.wait()
            except TimeoutError:
                pass
            wakeup.clear()

    async def _poll_once(self, backend: Backend) -> None:
        status, body, error = await self._get(backend, "/health")
        if status == 200:
            await self._refresh(backend)
            self._record_success(backend)
        elif status == 503 and _is_loading(body):
            backend.successes = 0
            backend.failures = 0
            self._set_state(backend, BackendState.LOADING, "loading model")
        elif error == "timeout" and backend.inflight > 0:
            # llama-server answers /health from a small HTTP thread pool; under a
            # full load of long streams it may be slow without being broken.
            log.debug("health slow while busy backend=%s", backend.name)
        else:
            self._record_failure(backend, error or f"/health returned HTTP {status}")

    async def _refresh(self, backend: Backend) -> None:
        props, models, slots = await asyncio.gather(
            self._get_json(backend, "/props"),
            self._get_json(backend, "/v1/models"),
            self._get_json(backend, "/slots"),
        )
        changed = False

        discovered = None
        if isinstance(props, dict) and isinstance(props.get("total_slots"), int):
            discovered = props["total_slots"]
        elif isinstance(slots, list):
            discovered = len(slots)
        if discovered is not None and discovered > 0:
            backend.discovered_slots = discovered
            if backend.config.slots is None and backend.capacity != discovered:
                log.info(
                    "backend slots changed backend=%s slots=%d previous=%d",
                    backend.name,
                    discovered,
                    backend.capacity,
                )
                backend.capacity = discovered
                changed = True

        if isinstance(models, dict) and isinstance(models.get("data"), list):
            changed |= self._update_models(backend, models["data"])

        if isinstance(slots, list):
            processing = sum(
                1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing")
            )
            # Our own requests may have started or finished while /slots was
            # produced; count only what cannot be ours, so a release never
            # reads as an external client and idles a slot until the next poll.
            external = max(0, processing - backend.inflight)
            if external != backend.external_busy:
                backend.external_busy = external
                changed = True
        elif backend.external_busy:
            backend.external_busy = 0
            changed = True

        if changed:
            self._on_change()

    def _update_models(self, backend: Backend, entries: list[Any]) -> bool:
        names: set[str] = set()
        loaded: set[str] = set()
        router = False
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            names.add(entry["id"])
            aliases = entry.get("aliases")
            if isinstance(aliases, list):
                names.update(a for a in aliases if isinstance(a, str))
            status = entry.get("status")
            if isinstance(status, dict):
                # Only router-mode llama-server reports a per-model status.
                router = True
                if status.get("value") in ("loaded", "loading"):
                    loaded.add(entry["id"])
        changed = False
        if backend.config.models is None and names != backend.models:
            log.info(
                "backend models changed backend=%s models=%s",
                backend.name,
                ",".join(sorted(names)) or "-",
            )
            backend.models = frozenset(names)
            changed = True
        if router != backend.router_mode:
            backend.router_mode = router
            changed = True
        if loaded != backend.loaded_models:
            backend.loaded_models = loaded
            changed = True
        return changed

    def _record_success(self, backend: Backend) -> None:
        backend.failures = 0
        backend.successes += 1
        backend._error_repeats = 0
        if backend.state is BackendState.HEALTHY:
            return
        # The first check after start-up admits a backend at once; a backend
        # that failed or was loading must pass `rise` checks in a row.
        if not backend.checked or backend.successes >= self._health.rise:
            self._set_state(backend, BackendState.HEALTHY, "")

    def _record_failure(self, backend: Backend, error: str) -> None:
        backend.successes = 0
        backend.failures += 1
        if backend.state is BackendState.UNHEALTHY:
            self._log_repeated_error(backend, error)
            return
        if backend.failures >= self._health.fall or backend.state is BackendState.LOADING:
            self._set_state(backend, BackendState.UNHEALTHY, error)
        else:
            log.warning(
                "health check failed backend=%s failures=%d fall=%d error=%s",
                backend.name,
                backend.failures,
                self._health.fall,
                error,
            )

    def _log_repeated_error(self, backend: Backend, error: str) -> None:
        # A dead backend fails every poll; log the first few, then every 30th.
        backend._error_repeats += 1
        repeats = backend._error_repeats
        if repeats <= 3 or repeats % 30 == 0:
            log.warning(
                "backend still unhealthy backend=%s error=%s repeats=%d",
                backend.name,
                error,
                repeats,
            )

    def _set_state(self, backend: Backend, state: BackendState, reason: str) -> None:
        old = backend.state
        if old is state:
            return
        backend.state = state
        backend.last_error = reason
        if state is BackendState.UNHEALTHY:
            # Slots seen busy on a dead process mean nothing for its successor.
            backend.external_busy = 0
        level = logging.INFO if state is BackendState.HEALTHY else logging.WARNING
        log.log(
            level,
            "backend state changed backend=%s from=%s to=%s reason=%s",
            backend.name,
            old,
            state,
            reason or "-",
        )
        if self._on_state is not None:
            self._on_state(backend, old, state)
        self._on_change()

    async def _get(self, backend: Backend, path: str) -> tuple[int, bytes, str]:
        headers = {}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        try:
            async with asyncio.timeout(self._health.timeout):
                async with self._session.get(
                    backend_url(backend, path),
                    headers=headers,
                    allow_redirects=False,
                ) as response:
                    return response.status, await response.read(), ""
        except TimeoutError:
            return 0, b"", "timeout"
        except aiohttp.ClientError as exc:
            return 0, b"", f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return 0, b"", f"{type(exc).__name__}: {exc}"

    async def _get_json(self, backend: Backend, path: str) -> Any:
        status, body, _error = await self._get(backend, path)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None


def _is_loading(body: bytes) -> bool:
    return b"Loading model" in body or b"loading" in body.lower()


def backend_url(backend: Backend, path: str, query: str = "") -> URL:
    """Join a request path onto the backend's base URL, keeping any prefix."""
    base = backend.url
    prefix = base.path.rstrip("/")
    url = base.with_path(prefix + path, encoded=False)
    if query:
        url = url.with_query(query)
    return url
