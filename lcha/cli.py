"""The `lcha` command: run the daemon or check a configuration file."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

from . import __version__
from .app import STATE, State, create_app, make_runner
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .systemd import Notifier, run_watchdog

log = logging.getLogger("lcha")


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

    path = args.config or os.environ.get("LCHA_CONFIG") or DEFAULT_CONFIG_PATH
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"lcha: invalid configuration: {exc}", file=sys.stderr)
        return 1

    if args.check_config:
        print(
            f"{path}: configuration is valid: listen={config.listen} "
            f"backends={len(config.backends)} policy={config.routing.policy}"
        )
        return 0

    if not config.backends:
        print(f"lcha: invalid configuration: {path}: backends: at least one backend is required", file=sys.stderr)
        return 1
    setup_logging(config)
    _install_event_loop_policy()
    try:
        return asyncio.run(serve(config, path))
    except KeyboardInterrupt:
        return 0


def setup_logging(config: Config) -> None:
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


def _install_event_loop_policy() -> None:
    if os.environ.get("LCHA_EVENT_LOOP", "auto") == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: Config, path: str) -> int:
    """Run lcha until SIGTERM or SIGINT, then drain and return the exit code."""
    notifier = Notifier.from_env()
    app = create_app(config)
    state = app[STATE]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    background: set[asyncio.Task[Any]] = set()

    def request_reload() -> None:
        task = loop.create_task(_reload(state, path, notifier))
        background.add(task)
        task.add_done_callback(background.discard)

    # Handlers go in before the socket opens: a SIGTERM that arrives while
    # backends are polled for the first time must drain, not kill.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, request_reload)

    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(
        runner, config.listen_host, config.listen_port, backlog=1024, reuse_address=True
    )
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen listen=%s error=%s", config.listen, exc)
        await runner.cleanup()
        return 1
    log.info("listening listen=%s", config.listen)

    await state.registry.wait_checked(config.health.timeout + 1.0)
    notifier.ready()
    notifier.status(state.status_line())

    watchdog_interval = notifier.watchdog_interval()
    if watchdog_interval is not None:
        background.add(loop.create_task(run_watchdog(notifier, watchdog_interval)))
    background.add(loop.create_task(_report_status(state, notifier)))

    await stop.wait()
    notifier.stopping()
    await drain(state)

    for task in list(background):
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await runner.cleanup()
    return 0


async def drain(state: State) -> None:
    """Stop taking requests, let running ones finish, then end the rest."""
    timeout = state.config.drain_timeout
    state.draining = True
    log.info(
        "draining active=%d queued=%d drain_timeout=%.0fs",
        len(state.active),
        len(state.dispatcher),
        timeout,
    )
    deadline = time.monotonic() + timeout
    while state.active and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if state.active:
        log.warning("drain timeout reached, ending requests remaining=%d", len(state.active))
        for task in list(state.active):
            task.cancel("lcha is shutting down")
        await asyncio.sleep(0.5)
    log.info("drained")


async def _reload(state: State, path: str, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        config = load_config(path)
        if not config.backends:
            raise ConfigError("backends: at least one backend is required")
    except ConfigError as exc:
        state.metrics.config_reloads.labels("failure").inc()
        log.error("config reload failed, keeping the running configuration error=%s", exc)
    else:
        state.reload(config)
        logging.getLogger().setLevel(config.log_level.upper())
        state.metrics.config_reloads.labels("success").inc()
        log.info(
            "config reloaded path=%s backends=%d policy=%s",
            path,
            len(config.backends),
            config.routing.policy,
        )
    notifier.ready()
    notifier.status(state.status_line())


async def _report_status(state: State, notifier: Notifier) -> None:
    previous = ""
    while True:
        await asyncio.sleep(5)
        line = state.status_line()
        if line != previous:
            notifier.status(line)
            previous = line
