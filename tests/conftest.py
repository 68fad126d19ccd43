"""Real parts: a Mosquitto started per test on a free loopback port, and real paho clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    from edge_agent import logs

    logs.configure("warning", "json")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def accepting(port: int) -> bool:
    """Something listens on 127.0.0.1:port (a broker, the metrics endpoint)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False



def log_events(path: Path, event: str) -> list[dict]:
    """The records of one event in a JSON log file written by the daemon (other lines skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out

class Broker:
    """A real Mosquitto on 127.0.0.1, with persistence in its own directory."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        conf = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            f"log_dest file {self.dir}/mosquitto.log",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information", "subscribe")),
        ]
        if os.geteuid() == 0:
            conf.append("user root")  # else it drops privileges and cannot write the temp dir
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not wait_for(lambda: accepting(self.port), timeout=10):
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log()[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""


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


class Collector:
    """Subscribes (persistent session, QoS 1) and records every message: what a plant consumer does."""

    def __init__(self, port: int, topic: str = "#", client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{port}-{id(self)}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def json(self, prefix: str = "") -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, retained in self.messages if t.startswith(prefix) and not retained]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"publisher-{port}-{id(self)}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(timeout=10)

    def note(self, topic: str, i: int, text: str | None = None) -> None:
        self.publish(topic, json.dumps({"id": f"n{i}", "text": text or f"P-{100 + i % 50} at {i % 90} bar"}))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


def write_config(
    path: Path, *, source_port: int, sink_port: int, outbox: Path, extra: str = "", routes: str | None = None
) -> Path:
    routes = (
        routes
        or """
[[routes]]
topic = "plant/+/notes"
text_field = "text"
id_field = "id"
output_topic = "edge/results/{topic}"
tasks = ["patterns"]
"""
    )
    path.write_text(f"""
gateway_id = "gw-test"
dead_letter_topic = "edge/deadletter"
[source]
port = {source_port}
keepalive = 5
reconnect_min_delay = 0.1
reconnect_max_delay = 0.5
[sink]
port = {sink_port}
keepalive = 5
reconnect_min_delay = 0.1
reconnect_max_delay = 0.5
replay_rate = 2000
[outbox]
path = "{outbox}"
[log]
level = "warning"
format = "json"
{extra}
{routes}
""")
    return path


class AgentProcess:
    """The daemon as a real subprocess, for crash tests."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.logpath = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self._logf = self.logpath.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self._logf.close()
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


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
