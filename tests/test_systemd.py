import asyncio
import logging
import os
import socket
import time
import uuid

import pytest

from lcha.systemd import Notifier, run_watchdog

RECEIVE_TIMEOUT = 2.0


@pytest.fixture
def path_socket(tmp_path):
    # An AF_UNIX path has at most 107 bytes, and pytest's tmp_path on Linux is shorter.
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECEIVE_TIMEOUT)
    yield str(path), sock
    sock.close()


@pytest.fixture
def abstract_socket():
    name = f"lcha-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECEIVE_TIMEOUT)
    yield "@" + name, sock
    sock.close()


def receive(sock):
    return sock.recv(4096).decode()


def test_ready_path_socket(path_socket):
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.ready()

    assert receive(sock) == "READY=1"


def test_ready_abstract_socket(abstract_socket):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.ready()

    assert receive(sock) == "READY=1"


def test_status_message(path_socket):
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.status("3/4 backends healthy")

    assert receive(sock) == "STATUS=3/4 backends healthy"


def test_status_newline_not_injected(abstract_socket):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.status("line one\nREADY=1")

    assert receive(sock) == "STATUS=line one READY=1"


def test_status_surrogate_replaced(abstract_socket):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.status("name \udcff")

    assert receive(sock) == "STATUS=name ?"


def test_watchdog_message(path_socket):
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.watchdog()

    assert receive(sock) == "WATCHDOG=1"


def test_stopping_message(abstract_socket):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.stopping()

    assert receive(sock) == "STOPPING=1"


def test_reloading_monotonic_usec(path_socket):
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = receive(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_messages_in_order(abstract_socket):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.ready()
    notifier.reloading()
    notifier.ready()
    notifier.stopping()

    assert receive(sock) == "READY=1"
    assert receive(sock).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert receive(sock) == "READY=1"
    assert receive(sock) == "STOPPING=1"


def test_unset_socket_noop():
    notifier = Notifier.from_env({})

    notifier.ready()
    notifier.status("idle")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()

    assert not notifier.enabled


def test_from_env_reads_os_environ(monkeypatch, abstract_socket):
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)

    Notifier.from_env().ready()

    assert receive(sock) == "READY=1"


def test_relative_socket_disabled(caplog):
    with caplog.at_level(logging.WARNING, logger="lcha.systemd"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "run/notify"})

    assert not notifier.enabled
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_send_error_logged_once(tmp_path, caplog):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})

    with caplog.at_level(logging.DEBUG, logger="lcha.systemd"):
        notifier.ready()
        notifier.watchdog()
        notifier.watchdog()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify send failed" in warnings[0].getMessage()
    assert "failures=3" in caplog.records[-1].getMessage()


def test_send_recovery_logged(tmp_path, caplog):
    path = tmp_path / "late.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    notifier.watchdog()

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECEIVE_TIMEOUT)
        with caplog.at_level(logging.INFO, logger="lcha.systemd"):
            notifier.watchdog()

        assert receive(sock) == "WATCHDOG=1"
    assert "sd_notify send recovered" in caplog.text


def test_full_queue_not_raised(abstract_socket, caplog):
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    # The receiver does not read, so its queue fills and later sends fail
    # with EAGAIN. 5000 sends exceed the queue limit, net.unix.max_dgram_qlen.
    with caplog.at_level(logging.WARNING, logger="lcha.systemd"):
        for _ in range(5000):
            notifier.watchdog()

    assert "Resource temporarily unavailable" in caplog.text
    assert receive(sock) == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    notifier = Notifier.from_env(environ)

    assert notifier.watchdog_interval() == expected


async def test_run_watchdog_pings(abstract_socket):
    address, sock = abstract_socket
    sock.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    loop = asyncio.get_running_loop()

    task = asyncio.create_task(run_watchdog(notifier, 0.01))
    try:
        for _ in range(3):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), RECEIVE_TIMEOUT)
            assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_watchdog_blocked_loop(abstract_socket):
    address, sock = abstract_socket
    sock.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    loop = asyncio.get_running_loop()

    task = asyncio.create_task(run_watchdog(notifier, 0.01))
    try:
        await asyncio.wait_for(loop.sock_recv(sock, 4096), RECEIVE_TIMEOUT)
        for _ in range(100):
            try:
                sock.recv(4096)
            except BlockingIOError:
                break

        # Synchronous code blocks the loop, so the pinging task cannot run.
        time.sleep(0.2)  # noqa: ASYNC251

        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), RECEIVE_TIMEOUT)
        assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_watchdog_invalid_interval():
    notifier = Notifier.from_env({})

    with pytest.raises(ValueError, match="must be positive"):
        await run_watchdog(notifier, 0)
