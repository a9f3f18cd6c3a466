"""Load and validate lcha's YAML configuration.

Every problem is reported as a `ConfigError` that names the key path and the
offending value, so a typo fails at start-up instead of silently changing
behaviour.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

DEFAULT_CONFIG_PATH = "/etc/lcha/lcha.yaml"

POLICIES = ("least_busy", "round_robin", "prefix")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping.

    Plain YAML keeps the last value, so a second `backends:` would silently
    replace the first list.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class ConfigError(ValueError):
    """An invalid configuration; the message names the key path and value."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    url: str
    api_key: str | None = None
    # None means "discover": /props total_slots, else the length of /slots.
    slots: int | None = None
    # None means "discover from /v1/models".
    models: tuple[str, ...] | None = None
    # Router-mode backends only: how many models lcha lets be loaded at once.
    max_models: int | None = None


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_size: int = 256
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = "least_busy"
    affinity_ttl: float = 600.0
    affinity_max_entries: int = 100_000
    # Prefix-aware routing.
    prefix_chunk_size: int = 128
    prefix_max_chunks: int = 200_000
    prefix_imbalance: int = 2
    prefix_warm_wait: float = 1.0
    prefix_pin_slot: bool = False
    # Router-mode (multi-model) backends.
    max_models: int | None = None
    max_queue_skip: int = 8
    model_unload_delay: float = 30.0
    model_limits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 2.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 3.0
    first_byte: float = 600.0
    idle: float = 120.0
    # How long a client may take to send its request headers and body.
    client_read: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    backends: tuple[BackendConfig, ...] = ()
    queue: QueueConfig = QueueConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_body_size: int = 64 * 1024 * 1024
    drain_timeout: float = 300.0
    log_level: str = "info"
    log_format: str = "text"
    log_prompts: bool = False
    source: str | None = None

    @property
    def listen(self) -> str:
        if ":" in self.listen_host:
            return f"[{self.listen_host}]:{self.listen_port}"
        return f"{self.listen_host}:{self.listen_port}"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the YAML file at `path`, apply `LCHA_*` overrides and validate.

    `path` None means `LCHA_CONFIG`, else `/etc/lcha/lcha.yaml`.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("LCHA_CONFIG") or DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(path)!r} not found; pass -c FILE or set LCHA_CONFIG"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    return parse_config(data, environ=env, source=str(path))


def parse_config(
    data: Any,
    environ: Mapping[str, str] | None = None,
    source: str | None = None,
) -> Config:
    """Validate an already-parsed YAML document and apply `LCHA_*` overrides."""
    env = os.environ if environ is None else environ
    root = _Section(data, "")

    listen = root.take("listen", _parse_listen, ("127.0.0.1", 8080))
    api_keys = root.take("api_keys", _parse_key_list, ())
    api_keys_file = root.take("api_keys_file", _parse_str, None)
    backends = root.take("backends", _parse_backends, ())
    if not backends:
        raise ConfigError("backends: at least one backend is required")
    queue = root.take("queue", _parse_queue, QueueConfig())
    routing = root.take("routing", _parse_routing, RoutingConfig())
    health = root.take("health", _parse_health, HealthConfig())
    timeouts = root.take("timeouts", _parse_timeouts, TimeoutsConfig())
    max_body_size = root.take("max_body_size", _parse_size, 64 * 1024 * 1024)
    drain_timeout = root.take("drain_timeout", _parse_duration, 300.0)
    log_level = root.take("log_level", _choice(LOG_LEVELS), "info")
    log_format = root.take("log_format", _choice(LOG_FORMATS), "text")
    log_prompts = root.take("log_prompts", _parse_bool, False)
    root.finish()

    if "LCHA_LISTEN" in env:
        listen = _parse_listen(env["LCHA_LISTEN"], "LCHA_LISTEN")
    if "LCHA_API_KEYS" in env:
        api_keys = tuple(k.strip() for k in env["LCHA_API_KEYS"].split(",") if k.strip())
    if "LCHA_LOG_LEVEL" in env:
        log_level = _choice(LOG_LEVELS)(env["LCHA_LOG_LEVEL"].lower(), "LCHA_LOG_LEVEL")

    if api_keys_file is not None:
        api_keys_file = _expand_env(api_keys_file, "api_keys_file", env)
        api_keys = api_keys + _read_key_file(api_keys_file)

    return Config(
        listen_host=listen[0],
        listen_port=listen[1],
        api_keys=api_keys,
        api_keys_file=api_keys_file,
        backends=backends,
        queue=queue,
        routing=routing,
        health=health,
        timeouts=timeouts,
        max_body_size=max_body_size,
        drain_timeout=drain_timeout,
        log_level=log_level,
        log_format=log_format,
        log_prompts=log_prompts,
        source=source,
    )


def parse_duration(value: Any) -> float:
    """Parse `500ms`, `2s`, `10m`, `1h` or a plain number of seconds."""
    return _parse_duration(value, "duration")


# --- sections --------------------------------------------------------------


class _Section:
    """A mapping whose keys are consumed one by one; leftovers are errors."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            where = path or "the config file"
            raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
        self._data = dict(data)
        self._path = path

    def key_path(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def take(self, key: str, parse: Callable[[Any, str], Any], default: Any) -> Any:
        if key not in self._data:
            return default
        value = self._data.pop(key)
        if value is None:
            return default
        return parse(value, self.key_path(key))

    def require(self, key: str, parse: Callable[[Any, str], Any]) -> Any:
        if key not in self._data or self._data[key] is None:
            raise ConfigError(f"{self.key_path(key)}: missing required key")
        return parse(self._data.pop(key), self.key_path(key))

    def finish(self) -> None:
        if self._data:
            names = ", ".join(repr(str(k)) for k in self._data)
            where = self._path or "top level"
            raise ConfigError(f"{where}: unknown key(s) {names}")


def _parse_backends(value: Any, path: str) -> tuple[BackendConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of backends, got {_describe(value)}")
    backends: list[BackendConfig] = []
    seen_names: set[str] = set()
    seen_urls: dict[str, str] = {}
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        section = _Section(item, item_path)
        url = section.require("url", _parse_url)
        name = section.take("name", _parse_name, None) or _default_name(url)
        backend = BackendConfig(
            name=name,
            url=url,
            api_key=section.take("api_key", _parse_str, None),
            slots=section.take("slots", _positive_int, None),
            models=section.take("models", _parse_model_list, None),
            max_models=section.take("max_models", _positive_int, None),
        )
        section.finish()
        if name in seen_names:
            raise ConfigError(f"{item_path}.name: duplicate backend name {name!r}")
        if url in seen_urls:
            raise ConfigError(
                f"{item_path}.url: {url!r} is already used by backend {seen_urls[url]!r}"
            )
        seen_names.add(name)
        seen_urls[url] = name
        backends.append(backend)
    return tuple(backends)


def _parse_queue(value: Any, path: str) -> QueueConfig:
    section = _Section(value, path)
    result = QueueConfig(
        max_size=section.take("max_size", _non_negative_int, 256),
        timeout=section.take("timeout", _parse_duration, 60.0),
    )
    section.finish()
    return result


def _parse_routing(value: Any, path: str) -> RoutingConfig:
    section = _Section(value, path)
    defaults = RoutingConfig()
    result = RoutingConfig(
        policy=section.take("policy", _choice(POLICIES), defaults.policy),
        affinity_ttl=section.take("affinity_ttl", _parse_duration, defaults.affinity_ttl),
        affinity_max_entries=section.take(
            "affinity_max_entries", _non_negative_int, defaults.affinity_max_entries
        ),
        prefix_chunk_size=section.take(
            "prefix_chunk_size", _positive_int, defaults.prefix_chunk_size
        ),
        prefix_max_chunks=section.take(
            "prefix_max_chunks", _positive_int, defaults.prefix_max_chunks
        ),
        prefix_imbalance=section.take(
            "prefix_imbalance", _non_negative_int, defaults.prefix_imbalance
        ),
        prefix_warm_wait=section.take(
            "prefix_warm_wait", _parse_duration, defaults.prefix_warm_wait
        ),
        prefix_pin_slot=section.take("prefix_pin_slot", _parse_bool, defaults.prefix_pin_slot),
        max_models=section.take("max_models", _positive_int, None),
        max_queue_skip=section.take(
            "max_queue_skip", _non_negative_int, defaults.max_queue_skip
        ),
        model_unload_delay=section.take(
            "model_unload_delay", _parse_duration, defaults.model_unload_delay
        ),
        model_limits=section.take("model_limits", _parse_model_limits, {}),
    )
    section.finish()
    return result


def _parse_health(value: Any, path: str) -> HealthConfig:
    section = _Section(value, path)
    result = HealthConfig(
        interval=section.take("interval", _positive_duration, 2.0),
        timeout=section.take("timeout", _positive_duration, 2.0),
        rise=section.take("rise", _positive_int, 2),
        fall=section.take("fall", _positive_int, 3),
    )
    section.finish()
    return result


def _parse_timeouts(value: Any, path: str) -> TimeoutsConfig:
    section = _Section(value, path)
    result = TimeoutsConfig(
        connect=section.take("connect", _positive_duration, 3.0),
        first_byte=section.take("first_byte", _positive_duration, 600.0),
        idle=section.take("idle", _positive_duration, 120.0),
        client_read=section.take("client_read", _positive_duration, 30.0),
    )
    section.finish()
    return result


# --- scalar parsers ----------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def _parse_duration(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration such as 2s or 500ms, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(f"{path}: {value!r} is not a duration such as 2s, 500ms, 10m or 1h")
    if seconds < 0 or not math.isfinite(seconds):
        raise ConfigError(f"{path}: {value!r} must be a finite duration >= 0")
    return seconds


def _positive_duration(value: Any, path: str) -> float:
    seconds = _parse_duration(value, path)
    if seconds <= 0:
        raise ConfigError(f"{path}: {value!r} must be greater than 0")
    return seconds


def _parse_size(value: Any, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ConfigError(f"{path}: {value!r} is not a size such as 32MiB or 1048576")
    if size <= 0:
        raise ConfigError(f"{path}: {value!r} must be greater than 0")
    return size


def _parse_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    return value


def _positive_int(value: Any, path: str) -> int:
    number = _parse_int(value, path)
    if number < 1:
        raise ConfigError(f"{path}: {value!r} must be at least 1")
    return number


def _non_negative_int(value: Any, path: str) -> int:
    number = _parse_int(value, path)
    if number < 0:
        raise ConfigError(f"{path}: {value!r} must be 0 or more")
    return number


def _parse_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def _parse_str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected a non-empty string, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        if value not in options:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(options)}")
        return value

    return parse


def _parse_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"{path}: {value!r} is not a valid backend name "
            "(letters, digits, '_', '.', ':', '-'; at most 64 characters)"
        )
    return value


def _parse_url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected an http(s) URL, got {value!r}")
    try:
        url = URL(value.strip())
    except ValueError:
        raise ConfigError(f"{path}: {value!r} is not an http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{path}: {value!r} is not an http(s) URL")
    if url.query_string or url.fragment or url.user:
        raise ConfigError(
            f"{path}: {value!r} must not contain credentials, a query or a fragment"
        )
    try:
        url.port
    except ValueError:
        raise ConfigError(f"{path}: {value!r} has an invalid port") from None
    if url.path.rstrip("/").endswith("/v1"):
        raise ConfigError(
            f"{path}: {value!r} ends in /v1; give the server's base URL, because "
            "lcha appends the request path (/v1/chat/completions, /health, ...) itself"
        )
    return str(url).rstrip("/")


def _default_name(url: str) -> str:
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}"


def _parse_listen(value: Any, path: str) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ConfigError(f"{path}: {value!r} is not host:port or [ipv6]:port")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or ":" in host:
                raise ConfigError(
                    f"{path}: {value!r} is not host:port (write IPv6 as [::1]:8080)"
                )
        host = host or "0.0.0.0"
    else:
        raise ConfigError(f"{path}: expected host:port, got {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{path}: {value!r} has an invalid port")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{path}: {host!r} is not an IPv6 address") from None
    return host, int(port_text)


def _parse_key_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of keys, got {_describe(value)}")
    keys = []
    for index, key in enumerate(value):
        if not isinstance(key, str) or not key.strip():
            # Never echo a key: a near-miss secret must not land in a log.
            raise ConfigError(f"{path}[{index}]: expected a non-empty string")
        keys.append(key.strip())
    return tuple(keys)


def _parse_model_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: expected a non-empty list of model names, got {value!r}")
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}[{index}]: expected a model name, got {name!r}")
    return tuple(value)


def _parse_model_limits(value: Any, path: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of model name to limit, got {value!r}")
    return {str(model): _positive_int(limit, f"{path}.{model}") for model, limit in value.items()}


def _expand_env(value: str, path: str, env: Mapping[str, str]) -> str:
    try:
        return string.Template(value).substitute(env)
    except KeyError as exc:
        raise ConfigError(
            f"{path}: {value!r} refers to ${{{exc.args[0]}}}, which is not set"
        ) from None
    except ValueError:
        raise ConfigError(f"{path}: {value!r} has an invalid $ substitution") from None


def _read_key_file(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"api_keys_file: {path!r} cannot be read: {exc.strerror}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return tuple(keys)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
