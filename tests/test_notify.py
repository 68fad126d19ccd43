"""sd_notify: READY/STOPPING reach a NOTIFY_SOCKET datagram socket; no socket means no-op."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.notify import Notifier
from edge_agent.sink import TokenBucket

from .conftest import write_config


def test_noop_without_socket(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")  # must not raise


def test_agent_sends_ready_then_stopping(tmp_path: Path, broker) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    try:
        cfg = config.load(
            write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db"),
            environ={},
        )
        agent = Agent(cfg, Notifier(path))
        stop = threading.Event()
        t = threading.Thread(target=agent.run, args=(stop,))
        t.start()
        assert sock.recv(1024).decode().splitlines()[0] == "READY=1"
        stop.set()
        t.join(30)
        assert sock.recv(1024) == b"STOPPING=1"
    finally:
        sock.close()
        agent.notifier.close()


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert b.take(100) == 5 and b.take(1) == 0
    now[0] = 0.35
    assert b.take(100) == 3
    now[0] = 100.0
    assert b.take(100) == 5  # never more than the burst
