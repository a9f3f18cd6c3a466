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

from .config import BackendConfig, Config

log = logging.getLogger(__name__)


class BackendState(enum.StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class Backend:
    """One llama-server process, as tracked by lcha.

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
        "model_slots",
        "model_external_busy",
        "router_max_models",
        "pending_loads",
        "unloading",
        "acquired_total",
        "last_progress",
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
        # Router mode: models the backend reports as loaded or loading, plus
        # the loads lcha caused since the last poll.
        self.loaded_models: set[str] = set()
        self.model_inflight: dict[str, int] = {}
        self.model_last_used: dict[str, float] = {}
        # Router mode: slots of each model's child process (its --parallel).
        self.model_slots: dict[str, int] = {}
        self.model_external_busy: dict[str, int] = {}
        # The router's --models-max from /props max_instances; 0 means unlimited.
        self.router_max_models: int | None = None
        # Model -> monotonic time lcha dispatched the request that loads it.
        self.pending_loads: dict[str, float] = {}
        # Models lcha asked the router to unload, until a poll shows them gone.
        self.unloading: set[str] = set()
        self.acquired_total = 0
        # Monotonic time of the last response byte from this backend.
        self.last_progress = 0.0
        self.successes = 0
        self.failures = 0
        self.last_error = ""
        # False until the first poll finished, so start-up readiness can wait on it.
        self.checked = False
        # Route name -> monotonic time until which the backend is known not to
        # serve it (llama-server returns 501 for /v1/embeddings without --embeddings).
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

    def model_capacity(self, model: str | None) -> int:
        """Return the slots one loaded model has on this router-mode backend.

        The configured `slots` wins. Otherwise the count discovered for that
        model applies, else the largest count discovered on this backend,
        else 1. The router starts every child with the same arguments unless
        a preset sets other ones, so one model's count fits the others.
        """
        if self.config.slots is not None:
            return self.config.slots
        if model is not None and model in self.model_slots:
            return self.model_slots[model]
        return max(self.model_slots.values(), default=1)

    def model_busy(self, model: str) -> int:
        return self.model_inflight.get(model, 0) + self.model_external_busy.get(model, 0)

    def model_free_slots(self, model: str) -> int:
        return self.model_capacity(model) - self.model_busy(model)

    def router_capacity(self) -> int:
        """Return the slots of all loaded models together, or of one when none is loaded."""
        if not self.loaded_models:
            return self.model_capacity(None)
        return sum(self.model_capacity(model) for model in self.loaded_models)

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
        # POST /models/unload requests still running.
        self._unloads: set[asyncio.Task[None]] = set()
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
        tasks = [*self._tasks.values(), *self._unloads]
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

    def report_loading(self, backend: Backend) -> None:
        """Mark `backend` as loading its model; it needs `rise` checks to return."""
        if backend.removed:
            return
        backend.successes = 0
        backend.failures = 0
        self._set_state(backend, BackendState.LOADING, "loading model")

    def unload_model(self, backend: Backend, model: str) -> None:
        """Ask a router-mode backend to unload `model`, without waiting for it."""
        task = asyncio.get_running_loop().create_task(
            self._post_unload(backend, model), name=f"lcha-unload-{backend.name}"
        )
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _post_unload(self, backend: Backend, model: str) -> None:
        if not await self._send_unload(backend, model):
            # The backend takes no load while the model is in `unloading`, so
            # a failing router gets at most one unload request per interval.
            await asyncio.sleep(self._health.interval)
            backend.unloading.discard(model)
            self._on_change()
            return
        # The router returns success before its child exits and lists the
        # model as loaded until the child is gone, so poll again a few times.
        for delay in (0.0, 0.25, 1.0):
            await asyncio.sleep(delay)
            if model not in backend.unloading:
                return
            self.wake(backend)

    async def _send_unload(self, backend: Backend, model: str) -> bool:
        headers = {}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        try:
            async with asyncio.timeout(self._health.timeout):
                async with self._session.post(
                    backend_url(backend, "/models/unload"),
                    json={"model": model},
                    headers=headers,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    body = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "model unload failed backend=%s model=%s error=%s",
                backend.name,
                model,
                f"{type(exc).__name__}: {exc}",
            )
            return False
        if status != 200:
            log.warning(
                "model unload failed backend=%s model=%s status=%d body=%s",
                backend.name,
                model,
                status,
                body[:200].decode("utf-8", "replace"),
            )
            return False
        log.info("model unload requested backend=%s model=%s", backend.name, model)
        return True

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
            problem = await self._refresh(backend)
            if problem:
                self._record_failure(backend, problem)
            else:
                self._record_success(backend)
        elif status == 503 and _is_loading(body):
            self.report_loading(backend)
        elif error == "timeout" and backend.inflight > 0 and self._made_progress(backend):
            # llama-server serves /health from a small HTTP thread pool; under a
            # full load of long streams it may be slow without being broken. A
            # backend that also stopped sending response bytes is hung instead.
            log.debug("health slow while busy backend=%s", backend.name)
        else:
            self._record_failure(backend, error or f"/health returned HTTP {status}")

    def _made_progress(self, backend: Backend) -> bool:
        window = self._health.interval + self._health.timeout + 1.0
        return time.monotonic() - backend.last_progress < window

    async def _refresh(self, backend: Backend) -> str:
        """Poll props, models and slots; return why the backend is unusable, or ""."""
        polled_at = time.monotonic()
        inflight_before = backend.inflight
        acquired_before = backend.acquired_total
        if backend.router_mode:
            # A router rejects /slots without ?model= (HTTP 400); its models'
            # slots are polled one by one below.
            props, (models_status, models_body, _error) = await asyncio.gather(
                self._get_json(backend, "/props"),
                self._get(backend, "/v1/models"),
            )
            slots = None
        else:
            props, (models_status, models_body, _error), slots = await asyncio.gather(
                self._get_json(backend, "/props"),
                self._get(backend, "/v1/models"),
                self._get_json(backend, "/slots"),
            )
        if models_status in (401, 403):
            # /health needs no key in llama-server, so a backend started with
            # --api-key passes it and fails every real request.
            return (
                f"/v1/models returned HTTP {models_status}: the backend rejected lcha's "
                f"key; set backends[].api_key for {backend.name!r} to its --api-key"
            )
        models = _json_or_none(models_body) if models_status == 200 else None
        changed = False

        if isinstance(models, dict) and isinstance(models.get("data"), list):
            changed |= self._update_models(backend, models["data"], polled_at)

        if backend.router_mode:
            changed |= await self._refresh_router(backend, props)
        else:
            # At any moment while /slots was produced, lcha had at most this
            # many requests of its own on the backend.
            ours = inflight_before + backend.acquired_total - acquired_before
            changed |= self._update_slots(backend, props, slots, max(ours, backend.inflight))

        if changed:
            self._on_change()
        return ""

    def _update_slots(self, backend: Backend, props: Any, slots: Any, ours: int) -> bool:
        """Apply /props and /slots; `ours` bounds lcha's own requests during the poll."""
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

        if isinstance(slots, list):
            processing = sum(
                1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing")
            )
            # Count only slots that cannot be lcha's own. A request released
            # after /slots was produced must not read as an external client,
            # which would idle its slot until the next poll.
            external = max(0, processing - ours)
            if external != backend.external_busy:
                backend.external_busy = external
                changed = True
        elif backend.external_busy:
            backend.external_busy = 0
            changed = True
        return changed

    def _update_models(self, backend: Backend, entries: list[Any], polled_at: float) -> bool:
        names: set[str] = set()
        loaded: set[str] = set()
        model_slots: dict[str, int] = {}
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
                parallel = _parallel_arg(status.get("args"))
                if parallel is not None:
                    model_slots[entry["id"]] = parallel

        changed = False
        # NOTE: loads are tracked by model id; a request that names a model by
        # one of its aliases is not matched to the loaded id.
        if router:
            if not backend.unloading <= loaded:
                backend.unloading &= loaded
                changed = True
            loaded = _merge_loads(backend, loaded, polled_at)

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

        if router:
            # Slot counts learnt from /slots?model= for loaded models stay
            # when the listing has no --parallel argument for them.
            merged = {**backend.model_slots, **model_slots}
            if merged != backend.model_slots:
                backend.model_slots = merged
                changed = True
        elif backend.model_slots or backend.model_external_busy or backend.pending_loads:
            # The router was replaced by a single-model server on the same URL.
            backend.model_slots = {}
            backend.model_external_busy = {}
            backend.pending_loads = {}
            backend.unloading = set()
            backend.router_max_models = None
            changed = True
        return changed

    async def _refresh_router(self, backend: Backend, props: Any) -> bool:
        changed = False
        if isinstance(props, dict):
            limit = props.get("max_instances")
            valid = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0
            if valid and limit != backend.router_max_models:
                backend.router_max_models = limit
                changed = True

        # autoload=false matters: a GET for an unloaded model would load it
        # and evict another (llama-server applies autoload to GET requests).
        names = sorted(backend.loaded_models)
        answers = await asyncio.gather(
            *(
                self._get_json(backend, "/slots", {"model": name, "autoload": "false"})
                for name in names
            )
        )
        external: dict[str, int] = {}
        for name, slots in zip(names, answers):
            # A model still loading, or only expected to load, returns HTTP 400.
            if not isinstance(slots, list):
                continue
            if slots and backend.model_slots.get(name) != len(slots):
                backend.model_slots[name] = len(slots)
                changed = True
            processing = sum(
                1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing")
            )
            # Same reasoning as for single-model backends: count only what
            # cannot be lcha's own requests for this model.
            busy = max(0, processing - backend.model_inflight.get(name, 0))
            if busy:
                external[name] = busy
        if external != backend.model_external_busy:
            backend.model_external_busy = external
            changed = True
        external_total = sum(external.values())
        if external_total != backend.external_busy:
            backend.external_busy = external_total
            changed = True

        capacity = backend.router_capacity()
        if capacity != backend.capacity:
            backend.capacity = capacity
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
            # Start-up state too: keep the reason visible in /health.
            backend.last_error = error
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
            backend.model_external_busy = {}
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

    async def _get(
        self, backend: Backend, path: str, params: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        # llama-server serves kept-alive connections from a fixed pool of
        # -np + 4 threads; an idle poll connection would hold one of them.
        headers = {"Connection": "close"}
        if backend.config.api_key:
            headers["Authorization"] = f"Bearer {backend.config.api_key}"
        url = backend_url(backend, path)
        if params:
            url = url.with_query(params)
        try:
            async with asyncio.timeout(self._health.timeout):
                async with self._session.get(
                    url,
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

    async def _get_json(
        self, backend: Backend, path: str, params: dict[str, str] | None = None
    ) -> Any:
        status, body, _error = await self._get(backend, path, params)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _parallel_arg(args: Any) -> int | None:
    """Return the --parallel value from a router model's child arguments."""
    if not isinstance(args, list):
        return None
    for index, arg in enumerate(args[:-1]):
        if arg in ("--parallel", "-np"):
            value = args[index + 1]
            if isinstance(value, str) and value.isdigit() and int(value) > 0:
                return int(value)
    return None


def _merge_loads(backend: Backend, polled: set[str], polled_at: float) -> set[str]:
    """Return the models to count as loaded, from a poll and lcha's own loads.

    A load lcha dispatched counts until a poll shows the model loaded or
    loading, or, once its requests are done, until a poll that started after
    the dispatch (a failed load). Until then the poll may predate both the
    load and the eviction it causes, so lcha's own view stays.
    """
    for model, dispatched_at in list(backend.pending_loads.items()):
        done = dispatched_at < polled_at and not backend.model_inflight.get(model)
        if model in polled or done:
            del backend.pending_loads[model]
    if backend.pending_loads:
        return set(backend.loaded_models)
    # The router keeps a request for a model that is not loaded waiting
    # until it is, so a model with requests in flight counts as loaded.
    in_flight = {model for model, count in backend.model_inflight.items() if count > 0}
    return polled | in_flight


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
