"""OpenAI-shaped error responses: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


class ApiError(Exception):
    """An error that lcha returns itself, before any response byte was sent."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        # Label for lcha_rejections_total, when lcha rejected the request.
        self.reason = reason

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        return error_response(
            self.status, self.message, self.type, self.code, self.param, self.headers
        )


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(message, type_, code, param)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, type_: str, code: str | None = None) -> bytes:
    """Return an SSE event carrying an error, for streams already under way."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param, reason="bad_request")


def model_not_found(model: str, available: list[str]) -> ApiError:
    listed = ", ".join(repr(m) for m in available[:20]) or "none"
    return ApiError(
        404,
        f"The model {model!r} does not exist or is not served here; available models: {listed}",
        "invalid_request_error",
        "model_not_found",
        "model",
        reason="model_not_found",
    )


def no_backend(model: str | None) -> ApiError:
    what = f"model {model!r}" if model else "this request"
    return ApiError(
        503,
        f"No healthy backend is available for {what}; retry later",
        "service_unavailable_error",
        "no_backend",
        headers={"Retry-After": "5"},
        reason="no_backend",
    )


# llama-server options needed by the route kinds that not every server serves.
CAPABILITY_HINTS = {
    "embeddings": "start llama-server with --embeddings (and --pooling mean for /v1/embeddings)",
    "rerank": "start llama-server with --reranking and a reranking model",
    "infill": "use a model with fill-in-the-middle tokens",
}


def not_supported(route_kind: str, model: str | None) -> ApiError:
    what = f"model {model!r}" if model else "any model"
    hint = CAPABILITY_HINTS.get(route_kind, "check the backends' llama-server options")
    return ApiError(
        501,
        f"No healthy backend serving {what} supports {route_kind} requests: {hint}",
        "not_supported_error",
        "route_not_supported",
        reason="no_backend",
    )


def queue_full(max_size: int) -> ApiError:
    return ApiError(
        429,
        f"The request queue is full ({max_size} waiting); retry later",
        "rate_limit_error",
        "queue_full",
        headers={"Retry-After": "1"},
        reason="queue_full",
    )


def queue_timeout(timeout: float) -> ApiError:
    return ApiError(
        503,
        f"No slot became free within the queue timeout of {timeout:g}s; retry later",
        "service_unavailable_error",
        "queue_timeout",
        headers={"Retry-After": "5"},
        reason="queue_timeout",
    )


def upstream_error(message: str, status: int = 502, code: str = "upstream_error") -> ApiError:
    return ApiError(status, message, "upstream_error", code)
