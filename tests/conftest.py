"""Fixtures around tests/kit: each starts a real part for one test and stops it at teardown."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .kit.agent import AgentProcess, Running
from .kit.broker import Broker
from .kit.clients import Collector, Publisher


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    from edge_agent import logs

    logs.configure("warning", "json")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def uplink(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "uplink").start()
    yield b
    b.stop()


@pytest.fixture
def collect() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(port: int, topic: str = "#") -> Collector:
        c = Collector(port, topic)
        made.append(c)
        assert c.subscribed.wait(10), "collector could not subscribe"
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def publisher() -> Iterator[Callable[[int], Publisher]]:
    made: list[Publisher] = []

    def make(port: int) -> Publisher:
        p = Publisher(port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def run_agent() -> Iterator[Callable[[Path], Running]]:
    """Start the Agent in-process on a thread (returns once its source is connected); stopped at teardown."""
    started: list[Running] = []

    def start(cfg_path: Path) -> Running:
        r = Running(cfg_path)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


@pytest.fixture
def spawn_agent() -> Iterator[Callable[[Path, Path], AgentProcess]]:
    """Start the daemon as a subprocess; whatever a failed test leaves running is killed at teardown."""
    made: list[AgentProcess] = []

    def spawn(cfg: Path, log: Path) -> AgentProcess:
        a = AgentProcess(cfg, log).start()
        made.append(a)
        return a

    yield spawn
    for a in made:
        if a.alive():
            a.kill(signal.SIGKILL)
