"""sd_notify: READY, STATUS, WATCHDOG and STOPPING reach the test's own NOTIFY_SOCKET datagram socket.

READY waits for the source broker (not the uplink); WATCHDOG pings stop while a task is wedged and go on
while a slow task reports progress. The stuck/slow tasks are test doubles injected in place of the
built tasks; everything else (brokers, agent, outbox, the socket) is real.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent import agent as agent_module
from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.message import Note
from edge_agent.notify import Notifier
from edge_agent.progress import heartbeat
from edge_agent.ratelimit import TokenBucket

from .kit import wait_for
from .kit.broker import Broker, free_port
from .kit.clients import Publisher
from .kit.config import write_config


class NotifyListener:
    """systemd's side of the socket: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().splitlines()))

    def times(self, field: str) -> list[float]:
        with self._lock:
            return [t for t, fields in self.messages if field in fields]

    def fields(self) -> list[str]:
        with self._lock:
            return [f for _, fields in self.messages for f in fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def run_in_thread() -> Iterator[Callable[[Agent], None]]:
    """Run Agents in threads; each is stopped (and joined) at teardown even when the test failed."""
    running: list[tuple[Agent, threading.Event, threading.Thread]] = []

    def run(agent: Agent) -> None:
        stop = threading.Event()
        t = threading.Thread(target=agent.run, args=(stop,))
        t.start()
        running.append((agent, stop, t))

    yield run
    for agent, stop, t in running:
        stop.set()
        t.join(60)
        agent.notifier.close()


def load(tmp_path: Path, source_port: int, sink_port: int) -> config.Config:
    cfg = tmp_path / "c.toml"
    write_config(cfg, source_port=source_port, sink_port=sink_port, outbox=tmp_path / "o.db")
    return config.load(cfg, environ={})


def test_noop_without_socket(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")  # must not raise


def test_agent_sends_ready_then_stopping(tmp_path: Path, broker, listener) -> None:
    agent = Agent(load(tmp_path, broker.port, broker.port), Notifier(listener.path))
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,))
    t.start()
    try:
        assert wait_for(lambda: "READY=1" in listener.fields(), timeout=30)
    finally:
        stop.set()
        t.join(60)
        agent.notifier.close()
    assert wait_for(lambda: "STOPPING=1" in listener.fields(), timeout=5)
    fields = listener.fields()
    assert fields.index("READY=1") < fields.index("STOPPING=1")


def test_ready_waits_for_the_source_broker_but_not_the_uplink(tmp_path: Path, listener, run_in_thread) -> None:
    """Start with both brokers down: STATUS says why, no READY. The source comes up: READY, though the
    uplink is still down, and a note sent now is stored in the outbox for later (store-and-forward)."""
    source = Broker(tmp_path / "source")  # its port is chosen, nothing listens on it yet
    agent = Agent(load(tmp_path, source.port, free_port()), Notifier(listener.path))
    run_in_thread(agent)
    try:
        assert wait_for(lambda: any(f.startswith("STATUS=waiting for the source broker") for f in listener.fields()),
                        timeout=60)
        time.sleep(2.0)  # a negative: give a wrong READY time to show up
        assert "READY=1" not in listener.fields()
        source.start()
        assert wait_for(lambda: "READY=1" in listener.fields(), timeout=30)
        assert agent.sink is not None and not agent.sink.connected.is_set()
        pub = Publisher(source.port)
        try:
            pub.note("plant/l1/notes", 1)
        finally:
            pub.close()
        assert wait_for(lambda: agent.outbox.stats().count == 1, timeout=30)
    finally:
        source.stop()


class BlockingTask:
    """Stands in for a model task that wedges (a hung native call): process() waits on an Event."""

    name = "patterns"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.entered_at = 0.0

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        self.entered_at = time.monotonic()
        self.entered.set()
        self.release.wait(120)
        return [{"ok": True} for _ in notes]

    def close(self) -> None:
        self.release.set()


class SlowTask:
    """Stands in for the generator on a big batch: long, but it reports each finished sub-batch."""

    name = "patterns"

    def __init__(self, steps: int, step_s: float) -> None:
        self.steps, self.step_s = steps, step_s
        self.span: tuple[float, float] | None = None

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        start = time.monotonic()
        for _ in range(self.steps):
            time.sleep(self.step_s)
            heartbeat()
        self.span = (start, time.monotonic())
        return [{"ok": True} for _ in notes]

    def close(self) -> None:
        pass


WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: the agent pings every 0.5 s while healthy


@pytest.fixture
def watchdog_env(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


def test_watchdog_pings_stop_while_a_task_is_stuck_and_resume_after(
    tmp_path: Path, broker, listener, run_in_thread, publisher, monkeypatch, watchdog_env
) -> None:
    task = BlockingTask()
    monkeypatch.setattr(agent_module, "build_tasks", lambda cfg: {"patterns": task})
    agent = Agent(load(tmp_path, broker.port, broker.port), Notifier(listener.path))
    run_in_thread(agent)
    assert wait_for(lambda: "READY=1" in listener.fields(), timeout=30)
    assert wait_for(lambda: len(listener.times("WATCHDOG=1")) >= 2, timeout=30)  # idle and healthy: pinging
    publisher(broker.port).note("plant/l1/notes", 1)
    assert task.entered.wait(30)
    time.sleep(5.0)  # stuck for 5 s, five watchdog periods
    released_at = time.monotonic()
    task.release.set()
    # The health window is one period (1 s) after the last beat (taking the batch), plus a 0.5 s tick.
    stuck = [t for t in listener.times("WATCHDOG=1") if task.entered_at + 2.0 < t < released_at]
    assert stuck == [], f"pinged {len(stuck)} times while the pipeline was wedged"
    assert wait_for(lambda: any(t > released_at for t in listener.times("WATCHDOG=1")), timeout=30)
    assert wait_for(lambda: agent.pipeline is not None and agent.pipeline.processed == 1, timeout=30)


def test_watchdog_keeps_pinging_through_a_slow_task_that_reports_progress(
    tmp_path: Path, broker, listener, run_in_thread, publisher, monkeypatch, watchdog_env
) -> None:
    """A 3 s task call, three watchdog periods long, beating every 0.25 s: the pings never stop."""
    task = SlowTask(steps=12, step_s=0.25)
    monkeypatch.setattr(agent_module, "build_tasks", lambda cfg: {"patterns": task})
    agent = Agent(load(tmp_path, broker.port, broker.port), Notifier(listener.path))
    run_in_thread(agent)
    assert wait_for(lambda: "READY=1" in listener.fields(), timeout=30)
    publisher(broker.port).note("plant/l1/notes", 1)
    assert wait_for(lambda: task.span is not None, timeout=60)
    assert task.span is not None
    start, end = task.span
    # Past the first period (where the beat of taking the batch alone would still count), pings go on
    # at about one per 0.5 s; without the task's heartbeats there would be none (the stuck test).
    during = [t for t in listener.times("WATCHDOG=1") if start + 1.5 < t <= end]
    assert len(during) >= 2, f"only {len(during)} pings in the last {end - start - 1.5:.1f} s of a slow batch"


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert b.take(100) == 5 and b.take(1) == 0
    now[0] = 0.35
    assert b.take(100) == 3
    now[0] = 100.0
    assert b.take(100) == 5  # never more than the burst
