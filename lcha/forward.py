"""Forward requests to backends and relay their responses.

Slot routes (generation, embeddings, rerank) wait for a lease from the
dispatcher and hold it until the response is relayed or aborted. Other routes
go to any healthy backend without a lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from multidict import CIMultiDict

from . import errors
from .affinity import conversation_hashes
from .backends import Backend, backend_url
from .dispatcher import NoBackend, PendingRequest, QueueFull, QueueTimeout
from .errors import ApiError

if TYPE_CHECKING:
    from .app import State
    from .slots import Lease

log = logging.getLogger(__name__)
access_log = logging.getLogger("lcha.access")

# Path -> route kind. Kinds group paths that share a backend capability.
SLOT_ROUTES = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completion",
    "/completion": "completion",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
    "/embedding": "embeddings",
    "/infill": "infill",
    "/rerank": "rerank",
    "/v1/rerank": "rerank",
    "/reranking": "rerank",
    "/v1/reranking": "rerank",
}
MODEL_ROUTES = {"/tokenize", "/detokenize", "/apply-template"}
# Routes lcha serves itself, apart from /health and /metrics.
LOCAL_ROUTES = {"/v1/models", "/models"}
# OpenAI-style streams end with `data: [DONE]`; llama.cpp's native /completion
# and /infill streams never send it and end with a final JSON event instead.
DONE_ROUTES = {"chat", "completions"}

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Client credentials must never reach a backend; the backend's own key is sent.
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-api-key",
    "cookie",
    "accept-encoding",
    # aiohttp's server already decoded a compressed request body.
    "content-encoding",
    "expect",
}
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date", "set-cookie"}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
DONE_MARKER = b"data: [DONE]"
# Enough stream tail to hold the final usage/timings event of a response.
TAIL_BYTES = 16384
MAX_ACCOUNTING_BODY = 4 * 1024 * 1024
# A 404 for an unknown model quotes at most this much of the requested name.
MAX_ECHOED_MODEL_CHARS = 200
# Seconds during which further identical backend errors are counted, not logged.
ERROR_LOG_INTERVAL = 10.0
# With log_prompts: true, the access line shows this many prompt characters.
PROMPT_EXCERPT_CHARS = 200
# Request fields holding the prompt of non-chat routes, in lookup order.
PROMPT_KEYS = ("prompt", "input", "query", "content")
SHUTDOWN_MESSAGE = (
    "lcha is shutting down and its drain_timeout passed before this request "
    "finished; retry the request"
)


class RetryableError(Exception):
    """The backend failed before any byte reached the client."""

    def __init__(self, kind: str, message: str, capability: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # A capability miss (501) does not use up the request's one retry.
        self.capability = capability


@dataclass(slots=True)
class Exchange:
    """Record of one request, for metrics and the access log."""

    request_id: str
    route: str
    method: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    model_label: str = ""
    backend: str = "-"
    status: int = 0
    queue_wait: float = 0.0
    ttfb: float | None = None
    tries: int = 0
    stage: str = "received"
    outcome: str = "ok"
    # Start of the prompt, set only when log_prompts is true.
    prompt: str | None = None
    # Whether lcha_requests_total has this request; _finish adds it if not.
    counted: bool = False


class Proxy:
    """The request handlers; all state lives on the app's `State`."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._error_log = _ErrorLogLimiter()

    # --- handlers ----------------------------------------------------------------

    async def handle_slot_route(self, request: web.Request) -> web.StreamResponse:
        route_kind = SLOT_ROUTES[request.path]
        exchange = self._new_exchange(request)
        try:
            return await self._slot_route(request, route_kind, exchange)
        except ApiError as exc:
            return self._reject(exchange, exc)
        except asyncio.CancelledError:
            if not self._ended_by_drain(request, exchange):
                self._count_abort(exchange)
                exchange.outcome = "client_aborted"
                exchange.status = 499
                raise
            # A started stream already carries an error event. Any other
            # request can still get a 503.
            if exchange.stage in ("streaming", "done"):
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return self._reject(exchange, _shutting_down())
        finally:
            self._finish(exchange)

    async def handle_model_route(self, request: web.Request) -> web.StreamResponse:
        exchange = self._new_exchange(request)
        try:
            body = await self._read_body(request)
            payload = self._parse_json(body)
            model = self._resolve_model(payload, exchange)
            return await self._forward_without_slot(request, body, model, exchange)
        except ApiError as exc:
            return self._reject(exchange, exc)
        except asyncio.CancelledError:
            if not self._ended_by_drain(request, exchange):
                self._mark_aborted(exchange)
            raise
        finally:
            self._finish(exchange)

    async def handle_other(self, request: web.Request) -> web.StreamResponse:
        exchange = self._new_exchange(request, route="other")
        try:
            body = await self._read_body(request)
            return await self._forward_without_slot(request, body, None, exchange)
        except ApiError as exc:
            return self._reject(exchange, exc)
        except asyncio.CancelledError:
            if not self._ended_by_drain(request, exchange):
                self._mark_aborted(exchange)
            raise
        finally:
            self._finish(exchange)

    # --- slot routes ---------------------------------------------------------------

    async def _slot_route(
        self, request: web.Request, route_kind: str, exchange: Exchange
    ) -> web.StreamResponse:
        state = self.state
        body = await self._read_body(request)
        payload = self._parse_json(body)
        model = self._resolve_model(payload, exchange)
        if state.config.log_prompts:
            exchange.prompt = _prompt_excerpt(payload)

        hashes = conversation_hashes(payload) if route_kind in ("chat", "completions", "completion", "infill") else []
        pending = PendingRequest(exchange.request_id, model, route_kind, payload, hashes)
        try:
            state.dispatcher.check_routable(pending)
        except NoBackend:
            raise self._unroutable(pending) from None
        stream = payload.get("stream") is True

        retries_left = 1
        capability_retries = len(state.registry)
        while True:
            exchange.stage = "queued"
            try:
                lease = await state.dispatcher.acquire(pending)
            except QueueFull:
                raise errors.queue_full(state.dispatcher.max_size) from None
            except QueueTimeout:
                exchange.queue_wait = time.monotonic() - pending.arrived_at
                raise errors.queue_timeout(state.dispatcher.timeout) from None
            except asyncio.CancelledError:
                exchange.queue_wait = time.monotonic() - pending.arrived_at
                raise
            exchange.queue_wait = time.monotonic() - pending.arrived_at
            exchange.backend = lease.backend.name
            exchange.tries += 1
            try:
                return await self._forward_with_lease(
                    request, body, payload, lease, pending, route_kind, stream, exchange
                )
            except RetryableError as exc:
                backend = lease.backend
                state.metrics.upstream_errors.labels(backend.name, exc.kind).inc()
                if exc.capability and capability_retries > 0:
                    capability_retries -= 1
                elif retries_left > 0:
                    retries_left -= 1
                    state.metrics.retries.labels(backend.name).inc()
                elif exc.capability:
                    raise self._unroutable(pending) from None
                else:
                    raise errors.upstream_error(
                        f"Backend {backend.name!r} failed: {exc.message}"
                    ) from None
                suppressed = self._error_log.allow(backend.name, exc.kind)
                if suppressed is not None:
                    log.warning(
                        "retrying on another backend request_id=%s backend=%s error=%s "
                        "suppressed=%d",
                        exchange.request_id,
                        backend.name,
                        exc.message,
                        suppressed,
                    )
                await lease.release()
                state.dispatcher.requeue(pending, backend)
                try:
                    state.dispatcher.check_routable(pending)
                except NoBackend:
                    if exc.capability:
                        raise self._unroutable(pending) from None
                    raise errors.upstream_error(
                        f"Backend {backend.name!r} failed and no other backend can "
                        f"take the request: {exc.message}"
                    ) from None
            finally:
                await lease.release()

    async def _forward_with_lease(
        self,
        request: web.Request,
        body: bytes,
        payload: dict[str, Any],
        lease: Lease,
        pending: PendingRequest,
        route_kind: str,
        stream: bool,
        exchange: Exchange,
    ) -> web.StreamResponse:
        state = self.state
        backend = lease.backend
        if lease.slot_id is not None and "id_slot" not in payload:
            payload = dict(payload, id_slot=lease.slot_id)
            body = json.dumps(payload).encode()
        exchange.stage = "prefill"
        dispatched_at = time.monotonic()
        upstream = await self._open_upstream(request, backend, body, exchange, stream)
        try:
            if upstream.status == 503:
                text = await _read_small(upstream)
                if b"Loading model" in text:
                    # A restarted process: logged, counted and forgotten by
                    # the prefix index like any state change.
                    state.registry.report_loading(backend)
                    state.registry.wake(backend)
                raise RetryableError("status_5xx", f"HTTP 503: {_snippet(text)}")
            if upstream.status == 501 and route_kind in ("embeddings", "rerank", "infill"):
                text = await _read_small(upstream)
                backend.mark_unsupported(route_kind)
                raise RetryableError(
                    "unsupported", f"HTTP 501: {_snippet(text)}", capability=True
                )
            if _is_event_stream(upstream) or (stream and upstream.status == 200):
                info = await self._relay_stream(
                    request, upstream, backend, route_kind, exchange, dispatched_at
                )
                response = info.pop("_response")
            else:
                response, info = await self._relay_body(
                    request, upstream, backend, exchange, dispatched_at
                )
        finally:
            _finish_upstream(upstream, exchange)
        self._account(backend, exchange, info)
        if info:
            state.dispatcher.policy.on_result(pending, lease, info)
        return response

    # --- upstream ------------------------------------------------------------------

    async def _open_upstream(
        self,
        request: web.Request,
        backend: Backend,
        body: bytes,
        exchange: Exchange,
        stream: bool = False,
    ) -> aiohttp.ClientResponse:
        state = self.state
        timeouts = state.config.timeouts
        headers = _upstream_headers(request, backend, exchange.request_id)
        if stream:
            # llama-server (11434.0.0) closes the connection after every
            # stream although its headers announce keep-alive. Without this
            # header aiohttp would pool the socket at the stream's end.
            headers["Connection"] = "close"
        url = backend_url(backend, request.path, request.query_string)
        try:
            async with asyncio.timeout(timeouts.first_byte):
                try:
                    return await self._send(request.method, url, body, headers)
                except aiohttp.ClientConnectorError:
                    raise
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                    # A pooled connection that the backend closed while it
                    # was idle fails before any response byte. The backend
                    # never received the request, so sending it again is safe.
                    log.debug(
                        "upstream connection lost before the response, resending "
                        "request_id=%s backend=%s error=%s",
                        exchange.request_id,
                        backend.name,
                        exc,
                    )
                    return await self._send(request.method, url, body, headers)
        except TimeoutError:
            state.metrics.upstream_errors.labels(backend.name, "first_byte_timeout").inc()
            raise errors.upstream_error(
                f"Backend {backend.name!r} sent no response within "
                f"timeouts.first_byte={timeouts.first_byte:g}s",
                status=504,
                code="upstream_timeout",
            ) from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError) as exc:
            state.registry.report_failure(backend, f"connect failed: {exc}")
            raise RetryableError("connect", f"connect failed: {exc}") from None
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise RetryableError("reset", f"connection lost before the response: {exc}") from None
        except aiohttp.ClientError as exc:
            raise RetryableError("reset", f"{type(exc).__name__}: {exc}") from None

    async def _send(
        self, method: str, url: Any, body: bytes, headers: CIMultiDict[str]
    ) -> aiohttp.ClientResponse:
        timeouts = self.state.config.timeouts
        return await self.state.session.request(
            method,
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=None
            ),
        )

    async def _relay_body(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        backend: Backend,
        exchange: Exchange,
        dispatched_at: float,
    ) -> tuple[web.Response, dict[str, Any]]:
        state = self.state
        idle = state.config.timeouts.idle
        chunks: list[bytes] = []
        try:
            while True:
                async with asyncio.timeout(idle if chunks else state.config.timeouts.first_byte):
                    chunk = await upstream.content.readany()
                if not chunk:
                    break
                now = time.monotonic()
                backend.last_progress = now
                if not chunks:
                    exchange.ttfb = now - dispatched_at
                chunks.append(chunk)
        except TimeoutError:
            state.metrics.upstream_errors.labels(backend.name, "idle_timeout").inc()
            raise errors.upstream_error(
                f"Backend {backend.name!r} stalled for more than timeouts.idle={idle:g}s "
                "while sending its response",
                status=504,
                code="upstream_timeout",
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            state.metrics.upstream_errors.labels(backend.name, "truncated").inc()
            state.registry.report_failure(backend, f"response cut off: {type(exc).__name__}")
            raise errors.upstream_error(
                f"Backend {backend.name!r} response was cut off: {type(exc).__name__}",
                code="upstream_truncated",
            ) from None
        if exchange.ttfb is None:
            exchange.ttfb = time.monotonic() - dispatched_at
        body = b"".join(chunks)
        if upstream.status >= 400:
            body = _openai_error_shape(body)
        headers = _downstream_headers(upstream)
        headers["X-Request-Id"] = exchange.request_id
        headers["X-Lcha-Backend"] = backend.name
        response = web.Response(status=upstream.status, body=body, headers=headers)
        exchange.status = upstream.status
        if upstream.status >= 500:
            state.metrics.upstream_errors.labels(backend.name, "status_5xx").inc()
        info: dict[str, Any] = {}
        if upstream.status == 200 and len(body) <= MAX_ACCOUNTING_BODY:
            info = _usage_from_json(body)
        exchange.stage = "done"
        return response, info

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        backend: Backend,
        route_kind: str,
        exchange: Exchange,
        dispatched_at: float,
    ) -> dict[str, Any]:
        state = self.state
        timeouts = state.config.timeouts
        content = upstream.content

        # Wait for the first event before committing to a 200: a failure here
        # can still be retried or reported with a proper status code.
        try:
            async with asyncio.timeout(timeouts.first_byte):
                first = await content.readany()
        except TimeoutError:
            state.metrics.upstream_errors.labels(backend.name, "first_byte_timeout").inc()
            raise errors.upstream_error(
                f"Backend {backend.name!r} sent no data within "
                f"timeouts.first_byte={timeouts.first_byte:g}s",
                status=504,
                code="upstream_timeout",
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            state.registry.report_failure(backend, f"stream cut before its first event: {exc}")
            raise RetryableError("reset", f"stream ended before its first event: {exc}") from None
        exchange.ttfb = time.monotonic() - dispatched_at

        headers = _downstream_headers(upstream)
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        headers["X-Request-Id"] = exchange.request_id
        headers["X-Lcha-Backend"] = backend.name
        headers.popall("Content-Encoding", None)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        exchange.status = upstream.status
        await response.prepare(request)
        exchange.stage = "streaming"

        tail = bytearray()
        chunk = first
        error_kind = None
        error_message = ""
        try:
            while chunk:
                backend.last_progress = time.monotonic()
                await response.write(chunk)
                tail += chunk
                if len(tail) > 2 * TAIL_BYTES:
                    # Trim in batches: slicing per event would copy the
                    # whole tail for every small SSE chunk.
                    del tail[:-TAIL_BYTES]
                async with asyncio.timeout(timeouts.idle):
                    chunk = await content.readany()
        except TimeoutError:
            error_kind = "idle_timeout"
            error_message = (
                f"Backend {backend.name!r} sent nothing for timeouts.idle={timeouts.idle:g}s"
            )
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            error_kind = "reset"
            error_message = f"Backend {backend.name!r} connection lost mid-stream: {type(exc).__name__}"
        except aiohttp.ClientOSError as exc:
            error_kind = "reset"
            error_message = f"Backend {backend.name!r} connection lost mid-stream: {exc}"
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # Only reached when handler cancellation is off: the write found
            # the client gone. Returning closes the upstream request.
            self._count_abort(exchange)
            exchange.outcome = "client_aborted"
            return {"_response": response}
        except asyncio.CancelledError:
            # While draining, a cancellation with the client still connected
            # comes from lcha ending requests at drain_timeout, not from a
            # disconnect, so the stream ends with an event that gives the reason.
            if not state.draining or request.transport is None:
                raise
            exchange.outcome = "shutdown"
            await self._abort_stream(
                request, response, SHUTDOWN_MESSAGE, "service_unavailable_error", "shutting_down"
            )
            raise

        if error_kind is None and upstream.status == 200 and route_kind in DONE_ROUTES:
            if DONE_MARKER not in tail[-256:]:
                error_kind = "truncated"
                error_message = f"Backend {backend.name!r} ended the stream without [DONE]"

        if error_kind == "reset":
            # A connection lost after the response started means the process
            # most likely died. A restarted one may have fewer slots, so it
            # gets no requests until health checks pass and reread its slots.
            state.registry.report_failure(backend, error_message)
        if error_kind is not None:
            state.metrics.upstream_errors.labels(backend.name, error_kind).inc()
            exchange.outcome = error_kind
            suppressed = self._error_log.allow(backend.name, error_kind)
            if suppressed is not None:
                log.warning(
                    "stream failed request_id=%s backend=%s error=%s suppressed=%d",
                    exchange.request_id,
                    backend.name,
                    error_message,
                    suppressed,
                )
            await self._abort_stream(request, response, error_message)
            return {"_response": response}

        exchange.stage = "done"
        info = _usage_from_sse_tail(bytes(tail)) if upstream.status == 200 else {}
        info["_response"] = response
        try:
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return info

    async def _abort_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        message: str,
        type_: str = "upstream_error",
        code: str = "upstream_stream_failed",
    ) -> None:
        # Send the error as an event, then close the connection without the
        # final empty chunk, so no client can mistake the stream for complete.
        try:
            await response.write(errors.sse_error_event(message, type_, code))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return
        transport = request.transport
        if transport is not None:
            transport.close()

    async def _forward_without_slot(
        self, request: web.Request, body: bytes, model: str | None, exchange: Exchange
    ) -> web.StreamResponse:
        state = self.state
        tried: set[Backend] = set()
        for _attempt in range(2):
            candidates = [
                b for b in state.registry if b.available and b.serves(model) and b not in tried
            ]
            if not candidates:
                if tried:
                    raise errors.upstream_error(
                        "Every backend tried failed before sending a response; retry later"
                    )
                raise errors.no_backend(model)
            # On a router-mode backend, naming a model that is not loaded
            # would load it (and maybe evict another): prefer one that has it.
            backend = min(
                candidates,
                key=lambda b: (
                    b.router_mode and model is not None and model not in b.loaded_models,
                    b.busy,
                    b.acquired_total,
                ),
            )
            backend.acquired_total += 1
            tried.add(backend)
            exchange.backend = backend.name
            exchange.tries += 1
            dispatched_at = time.monotonic()
            try:
                upstream = await self._open_upstream(request, backend, body, exchange)
            except RetryableError as exc:
                state.metrics.upstream_errors.labels(backend.name, exc.kind).inc()
                state.metrics.retries.labels(backend.name).inc()
                continue
            try:
                if _is_event_stream(upstream):
                    info = await self._relay_stream(
                        request, upstream, backend, "other", exchange, dispatched_at
                    )
                    return info["_response"]
                response, _info = await self._relay_body(
                    request, upstream, backend, exchange, dispatched_at
                )
                return response
            finally:
                _finish_upstream(upstream, exchange)
        raise errors.upstream_error("Every backend tried failed before sending a response; retry later")

    # --- request parsing -------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytes:
        state = self.state
        limit = state.config.max_body_size
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(length, limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(state.config.timeouts.client_read):
                # Read by hand instead of request.read(): the limit can change
                # on reload, and it must count decompressed bytes.
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        # The decoded size counts, and a compressed body's
                        # Content-Length does not tell it.
                        raise _too_large(None, limit)
                    chunks.append(chunk)
            return b"".join(chunks)
        except (web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
            # A body whose Content-Encoding does not match its bytes, or a
            # broken chunked encoding.
            detail = " ".join(str(exc).split())
            raise errors.bad_request(f"The request body could not be read: {detail}") from None
        except TimeoutError:
            raise ApiError(
                408,
                "The request body was not received within "
                f"timeouts.client_read={state.config.timeouts.client_read:g}s",
                "invalid_request_error",
                "request_timeout",
                headers={"Connection": "close"},
                reason="bad_request",
            ) from None

    def _parse_json(self, body: bytes) -> dict[str, Any]:
        if not body:
            raise errors.bad_request("The request body is empty; expected a JSON object")
        try:
            payload = json.loads(body)
        except UnicodeDecodeError:
            raise errors.bad_request("The request body is not valid UTF-8") from None
        except ValueError as exc:
            raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise errors.bad_request("The request body nests JSON too deeply") from None
        if not isinstance(payload, dict):
            raise errors.bad_request(
                f"The request body must be a JSON object, got {type(payload).__name__}"
            )
        return payload

    def _resolve_model(self, payload: dict[str, Any], exchange: Exchange) -> str | None:
        model = payload.get("model")
        state = self.state
        if model is None:
            exchange.model_label = ""
            self._count_request(exchange)
            return None
        if not isinstance(model, str):
            self._count_request(exchange)
            raise errors.bad_request(
                f"'model' must be a string, got {type(model).__name__} {model!r}", param="model"
            )
        known = state.registry.known_models()
        if model not in known:
            # Client-chosen names would make label values unbounded.
            exchange.model_label = "unknown"
            self._count_request(exchange)
            if len(model) > MAX_ECHOED_MODEL_CHARS:
                model = model[:MAX_ECHOED_MODEL_CHARS] + "..."
            if any(not b.models and b.config.models is None for b in state.registry):
                # A backend whose models are not known yet (still starting or
                # loading) may serve this name: ask the client to come back.
                raise errors.no_backend(model) from None
            raise errors.model_not_found(model, sorted(state.registry.available_models()))
        exchange.model = model
        exchange.model_label = model
        self._count_request(exchange)
        return model

    def _unroutable(self, pending: PendingRequest) -> ApiError:
        serving = [
            b for b in self.state.registry if b.available and b.serves(pending.model)
        ]
        if serving and not any(b.supports(pending.route) for b in serving):
            return errors.not_supported(pending.route, pending.model)
        return errors.no_backend(pending.model)

    # --- bookkeeping -------------------------------------------------------------------

    def record_local(self, request: web.Request, status: int, outcome: str) -> None:
        """Count and log a request that lcha responded to without a proxy handler.

        Middlewares call it for requests they reject (401, 503 while draining),
        so every request gets its access line and its lcha_responses_total.
        """
        path = request.path
        # The path is client-chosen: only known paths become label values.
        route = path if path in SLOT_ROUTES or path in MODEL_ROUTES or path in LOCAL_ROUTES else "other"
        exchange = self._new_exchange(request, route=route)
        exchange.status = status
        exchange.outcome = outcome
        self._finish(exchange)

    def _new_exchange(self, request: web.Request, route: str | None = None) -> Exchange:
        header_id = request.headers.get("X-Request-Id", "")
        request_id = header_id if REQUEST_ID_RE.match(header_id) else secrets.token_hex(8)
        return Exchange(request_id=request_id, route=route or request.path, method=request.method)

    def _reject(self, exchange: Exchange, exc: ApiError) -> web.Response:
        if exc.reason is not None:
            self.state.metrics.rejections.labels(exc.reason).inc()
        exchange.status = exc.status
        exchange.outcome = exc.code or exc.type
        response = exc.response()
        response.headers["X-Request-Id"] = exchange.request_id
        if exchange.backend != "-":
            response.headers["X-Lcha-Backend"] = exchange.backend
        return response

    def _count_request(self, exchange: Exchange) -> None:
        # Counted once the model label is known; _finish counts requests
        # rejected before that point, so requests and responses always match.
        self.state.metrics.requests.labels(exchange.route, exchange.model_label).inc()
        exchange.counted = True

    def _ended_by_drain(self, request: web.Request, exchange: Exchange) -> bool:
        # With the client still connected, lcha itself cancelled the handler
        # when drain_timeout passed. _relay_stream marks a stream it ended that
        # way first, because it closes the client connection itself.
        if exchange.outcome != "shutdown" and not (
            self.state.draining and request.transport is not None
        ):
            return False
        exchange.outcome = "shutdown"
        return True

    def _mark_aborted(self, exchange: Exchange) -> None:
        self._count_abort(exchange)
        exchange.outcome = "client_aborted"
        exchange.status = 499

    def _count_abort(self, exchange: Exchange) -> None:
        stage = exchange.stage if exchange.stage in ("queued", "prefill", "streaming") else "prefill"
        self.state.metrics.client_aborts.labels(exchange.route, stage).inc()

    def _account(self, backend: Backend, exchange: Exchange, info: dict[str, Any]) -> None:
        metrics = self.state.metrics
        label = exchange.model_label
        if exchange.ttfb is not None:
            metrics.time_to_first_byte.labels(exchange.route, label, backend.name).observe(exchange.ttfb)
        prompt = info.get("prompt_tokens")
        if prompt:
            metrics.prompt_tokens.labels(backend.name, label).inc(prompt)
        completion = info.get("completion_tokens")
        if completion:
            metrics.completion_tokens.labels(backend.name, label).inc(completion)
        cached = info.get("cached_tokens")
        if cached:
            metrics.prompt_tokens_cached.labels(backend.name, label).inc(cached)

    def _finish(self, exchange: Exchange) -> None:
        metrics = self.state.metrics
        duration = time.monotonic() - exchange.started
        status = exchange.status or 500
        if not exchange.counted:
            self._count_request(exchange)
        metrics.responses.labels(exchange.route, exchange.model_label, str(status)).inc()
        metrics.request_duration.labels(exchange.route, exchange.model_label).observe(duration)
        if access_log.isEnabledFor(logging.INFO):
            line = (
                "request request_id=%s method=%s route=%s model=%s backend=%s status=%d "
                "outcome=%s tries=%d queue_wait=%.3f ttfb=%s duration=%.3f"
            )
            fields: list[Any] = [
                exchange.request_id,
                exchange.method,
                exchange.route,
                exchange.model or "-",
                exchange.backend,
                status,
                exchange.outcome,
                exchange.tries,
                exchange.queue_wait,
                f"{exchange.ttfb:.3f}" if exchange.ttfb is not None else "-",
                duration,
            ]
            if exchange.prompt is not None:
                # JSON quoting keeps newlines and quotes of the prompt from
                # breaking the line into several or faking other fields.
                line += " prompt=%s"
                fields.append(json.dumps(exchange.prompt, ensure_ascii=False))
            access_log.info(line, *fields)


class _ErrorLogLimiter:
    """Rate limit for backend error lines: one per backend and error kind per interval.

    A backend that fails every request while its /health still passes would
    otherwise write one warning per request. Each access line still records
    the request's outcome and tries.
    """

    __slots__ = ("_last_logged", "_suppressed")

    def __init__(self) -> None:
        self._last_logged: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def allow(self, backend: str, kind: str) -> int | None:
        """Return None to skip this line, else how many were skipped since the last one."""
        key = (backend, kind)
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is not None and now - last < ERROR_LOG_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last_logged[key] = now
        return self._suppressed.pop(key, 0)


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        SHUTDOWN_MESSAGE,
        "service_unavailable_error",
        "shutting_down",
        headers={"Connection": "close", "Retry-After": "5"},
    )


def _prompt_excerpt(payload: dict[str, Any]) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        # The last message is what a new turn of a conversation adds.
        text = _content_text(messages[-1].get("content"))
    else:
        key = next((k for k in PROMPT_KEYS if k in payload), None)
        text = _content_text(payload[key]) if key is not None else ""
    if len(text) > PROMPT_EXCERPT_CHARS:
        text = text[:PROMPT_EXCERPT_CHARS] + "..."
    return text


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = [part["text"] for part in content if isinstance(part.get("text"), str)]
        if texts:
            return " ".join(texts)
    return json.dumps(content, ensure_ascii=False)


def _too_large(length: int | None, limit: int) -> ApiError:
    size = f" ({length} bytes)" if length is not None else ""
    return ApiError(
        413,
        f"The request body{size} exceeds max_body_size={limit} bytes",
        "invalid_request_error",
        "request_too_large",
        headers={"Connection": "close"},
        reason="too_large",
    )


def _upstream_headers(request: web.Request, backend: Backend, request_id: str) -> CIMultiDict[str]:
    connection_tokens = {
        token.strip().lower() for token in request.headers.get("Connection", "").split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in REQUEST_DROP or lower in connection_tokens:
            continue
        headers.add(name, value)
    # aiohttp would otherwise ask for gzip and the relay would have to re-encode.
    headers["Accept-Encoding"] = "identity"
    headers["X-Request-Id"] = request_id
    if backend.config.api_key:
        headers["Authorization"] = f"Bearer {backend.config.api_key}"
    return headers


def _downstream_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    connection_tokens = {
        token.strip().lower() for token in upstream.headers.get("Connection", "").split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in RESPONSE_DROP or lower in connection_tokens:
            continue
        headers.add(name, value)
    return headers


def _finish_upstream(upstream: aiohttp.ClientResponse, exchange: Exchange) -> None:
    if exchange.stage == "done":
        # Fully read: the connection goes back to the pool unless the
        # response carried Connection: close.
        upstream.release()
    else:
        # Closing the socket is how llama-server learns to stop generating
        # and free its slot.
        upstream.close()


def _is_event_stream(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.content_type == "text/event-stream"


async def _read_small(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        async with asyncio.timeout(5):
            return await upstream.content.read(4096)
    except (TimeoutError, aiohttp.ClientError):
        return b""


def _openai_error_shape(body: bytes) -> bytes:
    """Give a backend's JSON error every key of OpenAI's error object.

    llama-server omits `param` and sends `code` as the HTTP status number;
    the message and type stay as the backend wrote them.
    """
    if len(body) > 65536:
        return body
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return body
    for key in ("type", "param", "code"):
        error.setdefault(key, None)
    return json.dumps(payload, ensure_ascii=False).encode()


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace").strip() or "(empty body)"


def _usage_from_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return _usage_from_object(data) if isinstance(data, dict) else {}


def _usage_from_sse_tail(tail: bytes) -> dict[str, Any]:
    # The usage and timings arrive in the last events before [DONE]; scan
    # backwards and stop at the first event that has either.
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]" or not data.startswith(b"{"):
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if isinstance(event, dict):
            info = _usage_from_object(event)
            if info:
                return info
    return {}


def _usage_from_object(data: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    timings = data.get("timings")
    usage = data.get("usage")
    if isinstance(timings, dict):
        cached = timings.get("cache_n")
        processed = timings.get("prompt_n")
        predicted = timings.get("predicted_n")
        if isinstance(cached, int):
            info["cached_tokens"] = cached
        if isinstance(processed, int):
            info["prompt_tokens"] = processed + (cached if isinstance(cached, int) else 0)
        if isinstance(predicted, int):
            info["completion_tokens"] = predicted
        prompt_ms = timings.get("prompt_ms")
        if isinstance(prompt_ms, (int, float)) and not isinstance(prompt_ms, bool):
            info["prompt_ms"] = float(prompt_ms)
    if isinstance(usage, dict):
        if "prompt_tokens" not in info and isinstance(usage.get("prompt_tokens"), int):
            info["prompt_tokens"] = usage["prompt_tokens"]
        if "completion_tokens" not in info and isinstance(usage.get("completion_tokens"), int):
            info["completion_tokens"] = usage["completion_tokens"]
        if "cached_tokens" not in info:
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                info["cached_tokens"] = details["cached_tokens"]
    slot_id = data.get("id_slot")
    if isinstance(slot_id, int) and not isinstance(slot_id, bool) and slot_id >= 0:
        info["slot_id"] = slot_id
    if "prompt_tokens" not in info and isinstance(data.get("tokens_evaluated"), int):
        info["prompt_tokens"] = data["tokens_evaluated"]
    if "completion_tokens" not in info and isinstance(data.get("tokens_predicted"), int):
        info["completion_tokens"] = data["tokens_predicted"]
    return info
