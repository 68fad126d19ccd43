"""The fault proxy itself does what the chaos scenarios rely on: each mode, against a plain echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ..kit.proxy import FaultProxy

pytestmark = pytest.mark.chaos


@pytest.fixture
def echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets its side on purpose
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    stop.set()
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()


@pytest.fixture
def proxy(echo: int) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as p:
        yield p


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _echoes(s: socket.socket, msg: bytes) -> bool:
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += s.recv(4096)
    return got == msg


def test_pass_forwards_both_ways(proxy):
    with _connect(proxy.port) as s:
        assert _echoes(s, b"hello")
    assert proxy.accepted == 1


def test_blackhole_holds_old_and_new_links_until_heal(proxy):
    old = _connect(proxy.port)
    assert _echoes(old, b"before")
    proxy.blackhole()
    new = _connect(proxy.port)  # accepted, but nothing gets through
    for s in (old, new):
        s.settimeout(0.5)
        s.sendall(b"during")
        with pytest.raises(TimeoutError):
            s.recv(100)
    proxy.heal()
    for s in (old, new):
        s.settimeout(10)
        assert s.recv(100) == b"during"  # held, then delivered: a partition, not a loss
        s.close()


def test_reset_sends_rst_to_open_links_and_new_ones_pass(proxy):
    s = _connect(proxy.port)
    assert _echoes(s, b"x")
    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        s.recv(100)
        s.sendall(b"y" * 100_000)  # in case the RST raced the recv: a write after it must fail
    s.close()
    with _connect(proxy.port) as again:
        assert _echoes(again, b"z")


def test_refuse_closes_the_listener_until_heal(proxy):
    s = _connect(proxy.port)
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    with pytest.raises(ConnectionResetError):
        s.recv(100)
        s.sendall(b"y" * 100_000)
    s.close()
    proxy.heal()
    with _connect(proxy.port) as again:
        assert _echoes(again, b"back")


def test_delay_holds_each_chunk_back(proxy):
    proxy.delay(300)
    with _connect(proxy.port) as s:
        t0 = time.monotonic()
        assert _echoes(s, b"slow")
        assert time.monotonic() - t0 >= 0.3 * 2  # once each way: a lower bound, never a speed claim
