"""systemd service notifications (sd_notify protocol) without libsystemd.

The protocol is one AF_UNIX datagram per message, holding newline-separated
``KEY=VALUE`` assignments, sent to the socket named in ``$NOTIFY_SOCKET``.
See sd_notify(3) and systemd.service(5).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "run_watchdog"]

log = logging.getLogger(__name__)


class Notifier:
    """Sender of readiness, status and watchdog messages to the service manager.

    Every method is a no-op when ``NOTIFY_SOCKET`` is unset, so callers do not
    check whether they run under systemd. Send errors are logged, never raised.
    """

    __slots__ = ("_address", "_watchdog_usec", "_watchdog_pid", "_failures")

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self._address = _parse_address(address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._failures = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Create a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        if environ is None:
            environ = os.environ
        return cls(
            environ.get("NOTIFY_SOCKET"),
            watchdog_usec=environ.get("WATCHDOG_USEC"),
            watchdog_pid=environ.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        """Whether messages are sent, that is, a usable ``NOTIFY_SOCKET`` was given."""
        return self._address is not None

    def ready(self) -> None:
        """Report that start-up, or a reload started by ``reloading()``, has finished."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status``."""
        # A newline would end the STATUS assignment and let the rest of the
        # text be read as further assignments such as READY=1.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        """Report that a configuration reload has started. ``ready()`` reports its end."""
        # systemd >= 253 uses this timestamp to tie RELOADING=1 to the reload
        # cycle it started for Type=notify-reload (sd_notify(3), MONOTONIC_USEC),
        # so both go in one datagram. Older versions ignore the field.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        """Report that shutdown has started."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Send one watchdog keep-alive ping."""
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Return the ping interval in seconds, or None when no watchdog is expected.

        The interval is half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
        recommends. A ``WATCHDOG_PID`` naming another process means the
        watchdog belongs to that process, so this one returns None.
        """
        if self._watchdog_usec is None:
            return None

        if self._watchdog_pid is not None:
            try:
                watchdog_pid = int(self._watchdog_pid)
            except ValueError:
                log.warning("watchdog disabled: invalid WATCHDOG_PID value=%r", self._watchdog_pid)
                return None
            if watchdog_pid != os.getpid():
                return None

        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("watchdog disabled: invalid WATCHDOG_USEC value=%r", self._watchdog_usec)
            return None
        if usec <= 0:
            log.warning("watchdog disabled: WATCHDOG_USEC is not positive value=%d", usec)
            return None

        return usec / 2 / 1_000_000

    def _send(self, message: str) -> None:
        if self._address is None:
            return

        # "replace" keeps a lone surrogate in a status text from raising here.
        data = message.encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking, so a full receive queue at the service manager
                # drops this message with EAGAIN instead of stalling the event loop.
                sock.setblocking(False)
                sock.sendto(data, self._address)
        except OSError as exc:
            self._failures += 1
            # The watchdog sends every few seconds, so only the first of
            # consecutive failures is a warning. The rest go to debug with a count.
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(
                level,
                "sd_notify send failed socket=%r field=%s failures=%d error=%s",
                self._address,
                message.split("=", 1)[0],
                self._failures,
                exc,
            )
            return

        if self._failures:
            log.info(
                "sd_notify send recovered socket=%r failures=%d", self._address, self._failures
            )
            self._failures = 0


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled.

    Pings are sent from the event loop itself, so a blocked loop stops them and
    systemd restarts the service once ``WatchdogSec`` has passed.
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")

    log.info("watchdog started interval=%.3fs", interval)
    try:
        while True:
            notifier.watchdog()
            await asyncio.sleep(interval)
    finally:
        log.info("watchdog stopped")


def _parse_address(address: str | None) -> str | None:
    if not address:
        return None

    # A leading '@' names a socket in the Linux abstract namespace, whose
    # kernel address starts with a NUL byte instead.
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address

    # Newer systemd releases also accept vsock: addresses, which a virtual
    # machine uses to notify its host. lcha does not support them.
    log.warning("sd_notify disabled: unsupported NOTIFY_SOCKET value=%r", address)
    return None
