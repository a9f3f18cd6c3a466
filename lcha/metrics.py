"""Prometheus metrics, one `CollectorRegistry` per application."""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__

# Time to first byte spans a cached 20 ms reply to minutes of prefill.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

BACKEND_STATES = ("loading", "healthy", "unhealthy", "draining")


class _ChildCache:
    """A labelled metric whose children are cached by label values.

    prometheus_client's `labels()` takes a lock and rebuilds the key on
    every call; the request path calls it several times per request.
    """

    __slots__ = ("metric", "_children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every lcha metric, registered in a registry owned by this object."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        self.requests = Counter(
            "lcha_requests", "Requests received.", ["route", "model"], registry=registry
        )
        self.responses = Counter(
            "lcha_responses",
            "Responses sent, by HTTP status code.",
            ["route", "model", "status"],
            registry=registry,
        )
        self.queue_length = Gauge(
            "lcha_queue_length", "Requests waiting for a slot.", registry=registry
        )
        self.queue_wait = Histogram(
            "lcha_queue_wait_seconds",
            "Time from arrival to dispatch onto a slot.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.time_to_first_byte = Histogram(
            "lcha_time_to_first_byte_seconds",
            "Time from dispatch to the first response byte from the backend.",
            ["route", "model", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "lcha_request_duration_seconds",
            "Time from arrival to the end of the response.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "lcha_prompt_tokens",
            "Prompt tokens reported by backends, cached ones included.",
            ["backend", "model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "lcha_completion_tokens",
            "Generated tokens reported by backends.",
            ["backend", "model"],
            registry=registry,
        )
        self.prompt_tokens_cached = Counter(
            "lcha_prompt_tokens_cached",
            "Prompt tokens served from a slot's KV cache (timings.cache_n).",
            ["backend", "model"],
            registry=registry,
        )
        self.backend_slots = Gauge(
            "lcha_backend_slots", "Slot capacity of a backend.", ["backend"], registry=registry
        )
        self.backend_slots_busy = Gauge(
            "lcha_backend_slots_busy",
            "Slots held by lcha's requests on a backend.",
            ["backend"],
            registry=registry,
        )
        self.backend_state = Gauge(
            "lcha_backend_state",
            "1 for the backend's current state, 0 for the others.",
            ["backend", "state"],
            registry=registry,
        )
        self.dispatches = Counter(
            "lcha_dispatches",
            "Requests dispatched onto a backend slot.",
            ["backend", "model"],
            registry=registry,
        )
        self.retries = Counter(
            "lcha_retries",
            "Requests retried on another backend, by the backend that failed.",
            ["backend"],
            registry=registry,
        )
        self.rejections = Counter(
            "lcha_rejections", "Requests rejected by lcha, by reason.", ["reason"], registry=registry
        )
        self.upstream_errors = Counter(
            "lcha_upstream_errors",
            "Failures talking to a backend, by kind.",
            ["backend", "kind"],
            registry=registry,
        )
        self.client_aborts = Counter(
            "lcha_client_aborts",
            "Clients that disconnected before their response ended, by stage.",
            ["route", "stage"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "lcha_config_reloads", "Configuration reloads, by result.", ["result"], registry=registry
        )
        self.build_info = Gauge(
            "lcha_build_info", "Always 1; labels carry versions.", ["version", "python"],
            registry=registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.model_loads = Counter(
            "lcha_model_loads",
            "Model loads that lcha caused on router-mode backends.",
            ["backend", "model"],
            registry=registry,
        )
        self.backend_models_loaded = Gauge(
            "lcha_backend_models_loaded",
            "Models loaded on a router-mode backend.",
            ["backend"],
            registry=registry,
        )
        self.queue_skips = Counter(
            "lcha_queue_skips",
            "Times a queued request was passed over for a younger one.",
            ["model"],
            registry=registry,
        )
        self.prefix_lookups = Counter(
            "lcha_prefix_lookups",
            "Prefix index lookups, by predicted result.",
            ["result"],
            registry=registry,
        )
        self.prefix_outcomes = Counter(
            "lcha_prefix_cache_outcomes",
            "Predicted against actual prompt cache use, from timings.cache_n.",
            ["prediction", "actual"],
            registry=registry,
        )
        # The request path touches these on every request.
        self.requests = _ChildCache(self.requests)
        self.responses = _ChildCache(self.responses)
        self.queue_wait = _ChildCache(self.queue_wait)
        self.time_to_first_byte = _ChildCache(self.time_to_first_byte)
        self.request_duration = _ChildCache(self.request_duration)
        self.prompt_tokens = _ChildCache(self.prompt_tokens)
        self.completion_tokens = _ChildCache(self.completion_tokens)
        self.prompt_tokens_cached = _ChildCache(self.prompt_tokens_cached)
        self.dispatches = _ChildCache(self.dispatches)
        for reason in (
            "queue_full",
            "queue_timeout",
            "no_backend",
            "model_not_found",
            "unauthorized",
            "bad_request",
            "too_large",
            "draining",
        ):
            self.rejections.labels(reason)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def set_backend_state(self, backend: str, state: str) -> None:
        for name in BACKEND_STATES:
            self.backend_state.labels(backend, name).set(1 if name == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST
