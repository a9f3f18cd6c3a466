"""A read timeout for request headers, which aiohttp's server lacks.

aiohttp 3.14 limits how long a connection may stay idle (keepalive_timeout),
and forward.py limits how long a request body may take (timeouts.client_read).
Nothing limits the headers: a client that sends them byte by byte keeps a
connection and a file descriptor until keepalive_timeout passes, counted from
the end of its previous request.

`HeaderTimeoutRunner` puts a protocol between each connection's transport and
aiohttp's `RequestHandler`. The first byte of a request starts a timer, and a
middleware stops it when the request reaches the application, which aiohttp
does once the headers are parsed. A connection whose timer fires gets a 408
response and is closed. Only public interfaces are used: asyncio's Protocol
methods, the runner's `server` protocol factory and a middleware. If one of
them is missing, connections run without the timeout and a warning is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

TimeoutGetter = Callable[[], float]
TimeoutHook = Callable[[], None]

_BODY = json.dumps(
    {
        "error": {
            "message": "The request headers were not received within timeouts.client_read",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
).encode()
RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _BODY
)


@web.middleware
async def header_timeout_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Stop the connection's header timer while the application handles a request.

    It must run first. A middleware before it that returns a response by
    itself would leave the timer running on a connection that got its response.
    """
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, HeaderDeadline):
        return await handler(request)
    guard.request_started(request.content)
    try:
        return await handler(request)
    finally:
        guard.request_finished()


class HeaderTimeoutRunner(web.AppRunner):
    """An `AppRunner` whose sites close connections that send headers too slowly.

    It inserts `header_timeout_middleware` first into the application's
    middlewares. `timeout_of` returns the current limit in seconds, read when
    a request's first byte arrives, so a configuration reload applies to new
    requests. `on_timeout` runs once per connection closed by the timer.
    """

    __slots__ = ("_enabled", "_factory", "_on_timeout", "_timeout_of", "_wrapped")

    def __init__(
        self,
        app: web.Application,
        *,
        timeout_of: TimeoutGetter,
        on_timeout: TimeoutHook | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._timeout_of = timeout_of
        self._on_timeout = on_timeout
        self._wrapped: web.Server | None = None
        self._factory: Any = None
        self._enabled = _install_middleware(app)

    @property
    def server(self) -> Any:
        # Sites build their listening sockets from this protocol factory.
        # cleanup() keeps using the aiohttp server itself.
        server = super().server
        if server is None or not self._enabled:
            return server
        if self._wrapped is not server:
            self._wrapped = server
            self._factory = _GuardedServer(server, self._timeout_of, self._on_timeout)
        return self._factory


class HeaderDeadline(asyncio.Protocol):
    """Forwards every protocol event to aiohttp's handler, timing request headers."""

    def __init__(
        self, inner: asyncio.Protocol, timeout_of: TimeoutGetter, on_timeout: TimeoutHook | None
    ) -> None:
        self._inner = inner
        self._timeout_of = timeout_of
        self._on_timeout = on_timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The body of the latest request. aiohttp keeps reading it after the
        # handler returned when the handler left it unread (a 401, a 413).
        self._payload: Any = None
        self._in_handler = False
        # True when bytes arrived during the handler, after the body ended.
        # They belong to a pipelined request, timed from this one's end.
        self._pipelined = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._transport = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._body_done():
            if self._in_handler:
                self._pipelined = True
            elif self._timer is None:
                self._arm(respond=True)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def request_started(self, payload: Any) -> None:
        self._cancel()
        self._payload = payload
        self._in_handler = True
        self._pipelined = False

    def request_finished(self) -> None:
        self._in_handler = False
        if self._pipelined and self._timer is None and self._transport is not None:
            # aiohttp may still be writing this response, so a timeout closes
            # the connection without a 408 that could land inside it.
            self._arm(respond=False)
        self._pipelined = False

    def _body_done(self) -> bool:
        # StreamReader.is_eof() turns true when the parser has fed the whole
        # body, whether or not the handler read it.
        if self._payload is None:
            return True
        is_eof = getattr(self._payload, "is_eof", None)
        return bool(is_eof()) if callable(is_eof) else False

    def _arm(self, respond: bool) -> None:
        timeout = self._timeout_of()
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout, self._expire, timeout, respond)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, timeout: float, respond: bool) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or self._in_handler:
            return
        peer = transport.get_extra_info("peername")
        log.info("request headers timed out peer=%s timeout=%gs", _format_peer(peer), timeout)
        if self._on_timeout is not None:
            self._on_timeout()
        if respond:
            transport.write(RESPONSE_408)
        transport.close()


class _GuardedServer:
    """Protocol factory wrapping a `web.Server`. Other attributes pass through."""

    def __init__(
        self, server: web.Server, timeout_of: TimeoutGetter, on_timeout: TimeoutHook | None
    ) -> None:
        self.server = server
        self._timeout_of = timeout_of
        self._on_timeout = on_timeout
        self._warned = False

    def __call__(self) -> asyncio.BaseProtocol:
        protocol = self.server()
        if isinstance(protocol, asyncio.BufferedProtocol) or not isinstance(
            protocol, asyncio.Protocol
        ):
            if not self._warned:
                self._warned = True
                log.warning(
                    "header timeout disabled reason=%s",
                    f"aiohttp's connection handler {type(protocol).__name__} "
                    "is not an asyncio.Protocol",
                )
            return protocol
        return HeaderDeadline(protocol, self._timeout_of, self._on_timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


def _install_middleware(app: web.Application) -> bool:
    middlewares = app.middlewares
    if middlewares and middlewares[0] is header_timeout_middleware:
        return True
    try:
        if header_timeout_middleware in middlewares:
            middlewares.remove(header_timeout_middleware)
        middlewares.insert(0, header_timeout_middleware)
    except (RuntimeError, AttributeError, TypeError) as exc:
        # A frozen application (already started) rejects new middlewares.
        log.warning("header timeout disabled reason=%s", f"cannot add its middleware: {exc}")
        return False
    return True


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "-"
