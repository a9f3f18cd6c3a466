"""The `lcha` command: run the daemon or check a configuration file.

Signals: SIGTERM and SIGINT start a drain, a second one ends it at once, and
SIGHUP reloads the configuration file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__
from .app import STATE, State, create_app, make_runner
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .systemd import Notifier, run_watchdog

log = logging.getLogger(__name__)

# How often the drain checks whether every admitted request has finished.
DRAIN_POLL_SECONDS = 0.05
# After drain_timeout, how long cancelled requests get to send their error
# event or 503 and release their slots before the server closes.
END_GRACE_SECONDS = 5.0
# Start-up readiness waits this long past health.timeout for the first polls.
READY_WAIT_EXTRA_SECONDS = 1.0
STATUS_INTERVAL_SECONDS = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lcha", description="Slot-aware load balancer for llama.cpp llama-server backends."
    )
    parser.add_argument(
        "-c",
        "--config",
        help=f"YAML configuration file (default: $LCHA_CONFIG, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print a summary and exit 0 (valid) or 1 (invalid)",
    )
    parser.add_argument("--version", action="version", version=f"lcha {__version__}")
    args = parser.parse_args(argv)

    path, origin = _config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if origin == "default" and not Path(path).exists():
            print(
                f"lcha: config file {path!r} not found. It is the default path, used because "
                "neither -c nor LCHA_CONFIG is set; pass -c FILE or set LCHA_CONFIG",
                file=sys.stderr,
            )
        else:
            print(f"lcha: invalid configuration: {exc}", file=sys.stderr)
        return 1

    if args.check_config:
        print(
            f"{path}: configuration is valid: listen={config.listen} "
            f"backends={len(config.backends)} policy={config.routing.policy}"
        )
        return 0

    setup_logging(config)
    log.info("config loaded path=%s from=%s", path, origin)
    try:
        return asyncio.run(serve(config, path))
    except KeyboardInterrupt:
        # Only reached for a SIGINT before serve() installed its handlers.
        return 0


def _config_path(option: str | None) -> tuple[str, str]:
    if option:
        return option, "option"
    from_env = os.environ.get("LCHA_CONFIG")
    if from_env:
        return from_env, "LCHA_CONFIG"
    return DEFAULT_CONFIG_PATH, "default"


def setup_logging(config: Config) -> None:
    """Send every log record to stderr in `config.log_format`, at `config.log_level`.

    Calling it again, as a reload does, replaces the handler.
    """
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    # aiohttp's own access log would duplicate lcha's and leak query strings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _Shutdown:
    """Shutdown requests: the first SIGTERM or SIGINT starts a drain, a second ends it."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            log.info("shutdown requested signal=%s", name)
            self.requested.set()
        elif not self.hurry.is_set():
            log.warning("second shutdown signal, ending running requests now signal=%s", name)
            self.hurry.set()


async def serve(config: Config, path: str) -> int:
    """Run lcha until SIGTERM or SIGINT, then drain and return the exit code."""
    loop = asyncio.get_running_loop()
    shutdown = _Shutdown()
    # Installed before anything slow, so a stop request during start-up still
    # drains instead of killing the process with the default SIGTERM action.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.on_signal, signum)

    notifier = Notifier.from_env()
    app = create_app(config)
    runner = make_runner(app)
    await runner.setup()
    state = app[STATE]
    site = web.TCPSite(
        runner, config.listen_host, config.listen_port, backlog=1024, reuse_address=True
    )
    try:
        await site.start()
    except OSError as exc:
        log.error("listen failed listen=%s error=%s", config.listen, exc)
        await runner.cleanup()
        return 1
    log.info("listening listen=%s pid=%d", config.listen, os.getpid())

    loop.add_signal_handler(signal.SIGHUP, _on_reload_signal, state, path, notifier, shutdown)

    # READY=1 means lcha can route: wait for one poll of every backend, so a
    # client sent here right after start-up does not get "no backend".
    await state.registry.wait_checked(config.health.timeout + READY_WAIT_EXTRA_SECONDS)
    if not shutdown.requested.is_set():
        notifier.ready()
        notifier.status(_status_text(state))
        summary = state.summary()
        log.info(
            "ready backends_healthy=%d backends=%d slots=%d",
            summary["backends"]["healthy"],
            len(state.registry),
            summary["slots"]["total"],
        )

    background: set[asyncio.Task[Any]] = set()
    watchdog_interval = notifier.watchdog_interval()
    if watchdog_interval is not None:
        background.add(loop.create_task(run_watchdog(notifier, watchdog_interval)))
    background.add(loop.create_task(_report_status(state, notifier)))

    await shutdown.requested.wait()
    notifier.stopping()
    await drain(state, notifier, shutdown.hurry)

    for task in list(background):
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await runner.cleanup()
    log.info("stopped")
    return 0


async def drain(state: State, notifier: Notifier, hurry: asyncio.Event | None = None) -> None:
    """Reject new requests, let admitted ones finish, then end the rest.

    Queued requests were admitted, so they are still dispatched. After
    `drain_timeout`, or at once when `hurry` is set, the remaining handlers
    are cancelled: forward.py then ends a running stream with an SSE error
    event and responds to any other request with 503.
    """
    timeout = state.config.drain_timeout
    state.draining = True
    started = time.monotonic()
    deadline = started + timeout
    log.info(
        "drain started active=%d queued=%d drain_timeout=%gs",
        len(state.active),
        len(state.dispatcher),
        timeout,
    )
    notifier.status(_status_text(state))

    while state.active and not (hurry is not None and hurry.is_set()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(remaining, DRAIN_POLL_SECONDS))

    leftover = list(state.active)
    if leftover:
        reason = "second_signal" if hurry is not None and hurry.is_set() else "drain_timeout"
        log.warning("drain ending requests remaining=%d reason=%s", len(leftover), reason)
        for task in leftover:
            task.cancel()
        _done, pending = await asyncio.wait(leftover, timeout=END_GRACE_SECONDS)
        if pending:
            log.error(
                "requests still running after cancellation remaining=%d grace=%gs",
                len(pending),
                END_GRACE_SECONDS,
            )
    log.info(
        "drain finished duration=%.3fs ended=%d", time.monotonic() - started, len(leftover)
    )


def _on_reload_signal(state: State, path: str, notifier: Notifier, shutdown: _Shutdown) -> None:
    if shutdown.requested.is_set():
        log.warning("config reload ignored while draining signal=SIGHUP")
        return
    log.info("config reload requested signal=SIGHUP path=%s", path)
    reload_config(state, path, notifier)


def reload_config(state: State, path: str, notifier: Notifier) -> bool:
    """Read `path` again and apply it, or keep the running configuration if it is invalid.

    Returns whether the new configuration is in use. Either way the result is
    counted in lcha_config_reloads_total and systemd gets READY=1 again.
    """
    notifier.reloading()
    try:
        config = load_config(path)
    except ConfigError as exc:
        state.metrics.config_reloads.labels("failure").inc()
        log.error("config reload failed, keeping the running configuration path=%s error=%s", path, exc)
        ok = False
    else:
        try:
            state.reload(config)
        except Exception:
            # The old configuration may be partly replaced. It still serves
            # requests, so report the failure instead of ending the process.
            state.metrics.config_reloads.labels("failure").inc()
            log.exception("config reload failed while applying it path=%s", path)
            ok = False
        else:
            setup_logging(config)
            state.metrics.config_reloads.labels("success").inc()
            log.info(
                "config reloaded path=%s backends=%d policy=%s",
                path,
                len(config.backends),
                config.routing.policy,
            )
            ok = True
    notifier.ready()
    notifier.status(_status_text(state))
    return ok


def _status_text(state: State) -> str:
    line = state.status_line()
    if state.draining:
        return f"draining, {len(state.active)} requests left; {line}"
    return line


async def _report_status(state: State, notifier: Notifier) -> None:
    previous = ""
    while True:
        await asyncio.sleep(STATUS_INTERVAL_SECONDS)
        line = _status_text(state)
        if line != previous:
            notifier.status(line)
            previous = line
