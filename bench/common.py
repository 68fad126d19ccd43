"""Shared parts of the MQTT benchmarks: a bench Mosquitto, realistic notes and results, and the child
processes that drive a run (publisher, consumer, the agent, the plain paho relay).

Every measured party runs in its own Python process, as in production: the agent (or its peer) gets a
GIL of its own, and the load generators (publisher, consumer) cannot steal it. Children speak JSON lines
on stdout ({"event": ...}); the parent stops the system under test by writing "stop" to its stdin. Times
are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the machine), so a publisher's
first send and a consumer's last receipt can be subtracted across processes.

    python -m bench.common consumer  --port P --topic 'edge/results/#' --expect N
    python -m bench.common publisher --port P --n N [--inflight 1000]
    python -m bench.common rows      --port P --db OUTBOX.db [--inflight 64]
    python -m bench.common agent     --config C.toml --log-level warning --log-file F
    python -m bench.common relay     --port P [--uplink-port U]

(from the repository root: the broker, the in-process agent runner and the config builder are tests/kit's).

Set BENCH_PYSPY=DIR to run the system under test (agent or relay) under ``py-spy record`` and keep one
profile per round in DIR, as collapsed stacks (``--format raw``: one "frame;frame;... count" line per
stack, for flamegraph.pl or speedscope). py-spy must be installed (``pip install py-spy``); sampling adds
overhead, so the figures of such a run are not comparable. BENCH_PYSPY_ARGS adds py-spy options, e.g.
"--gil" to sample only the thread holding the GIL (where the CPU goes, without I/O waits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.kit import REPO, wait_for
from tests.kit.broker import Broker
from tests.kit.config import write_toml

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

IN_FILTER = "plant/+/notes"
OUT_PREFIX = "edge/results/"
OUT_FILTER = "edge/results/#"
# The load publisher's window. Large, but not 1000: paho walks its whole window on every PUBACK
# (Client._update_inflight), so 1000 costs the publisher ~2x the CPU of 100 on a 2-core box where it
# competes with the system under test (5000 notes alone: 1.07 s at 1000, 0.45 s at 100).
PUBLISHER_INFLIGHT = 100


# -- the machine and the peers --------------------------------------------------------------------------

# Every peer lives in an ignored folder of the repository, installed by `bash bench/setup` (the peers'
# interpreters are named in their benches, which their children import: bench/classify.py, generate.py);
# an environment variable may point elsewhere.
BENCH_DIR = REPO / ".bench"
SETUP_HINT = "run `bash bench/setup` (installs every bench peer into .bench/, idempotent)"
GGUF_DIR = Path(os.environ.get("BENCH_GGUF_DIR") or BENCH_DIR / "gguf")

# The CPU flags that decide how fast int8 (and Q4) inference runs: AVX2 everywhere, VNNI dot products
# (AVX-512 or the VEX form), AMX tiles. A ratio measured on one set does not carry over to another.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict[str, Any]:
    """What every bench row records about the machine it ran on: the CPU model (and its family/model
    numbers, which tell e.g. Zen 3 from Zen 5 where the name is just "AMD EPYC"), its int8-relevant
    flags, the cores this process may use and the load average (1, 5, 15 min) when the row was written."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
            if not line.strip() and info:
                break  # the first processor's block is enough
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "cpu_flags": {f: f in flags for f in INT8_FLAGS},
            "cores": cores, "load_avg": [round(x, 2) for x in os.getloadavg()]}


class Peer:
    """A peer a bench needs that the project venv does not have: `missing()` says why it cannot run
    (None when it can). `python` + `module`: an interpreter that must import a module; `path`: a file or
    program that must exist."""

    def __init__(self, name: str, *, python: str | None = None, module: str | None = None,
                 path: str | Path | None = None) -> None:
        self.name, self.python, self.module, self.path = name, python, module, path

    def missing(self) -> str | None:
        if self.path is not None and not (Path(self.path).exists() or shutil.which(str(self.path))):
            return f"{self.name}: {self.path} not found"
        if self.python is not None:
            if not Path(self.python).exists():
                return f"{self.name}: no interpreter at {self.python}"
            if self.module:
                proc = subprocess.run([self.python, "-c", f"import {self.module}"], capture_output=True, text=True)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    return f"{self.name}: `import {self.module}` fails in {self.python}: {last}"
        return None


# -- the broker ---------------------------------------------------------------------------------------

# Mosquitto tuned so that it is not the bottleneck: no persistence, no cap on outgoing QoS 1 messages in
# flight (max_inflight_messages 0), a deep per-client queue (an offline or slow subscriber's backlog stays
# queued, not dropped), and TCP_NODELAY on its sockets. Logs: errors and warnings only.
BROKER_SETTINGS = (
    "persistence false",
    "max_inflight_messages 0",
    "max_queued_messages 1000000",
    "max_queued_bytes 0",
    "set_tcp_nodelay true",
)


def bench_broker(workdir: Path) -> Broker:
    """The bench Mosquitto (BROKER_SETTINGS), not started: `with bench_broker(dir) as b:` runs it."""
    return Broker(workdir, settings=(*BROKER_SETTINGS, "log_type error", "log_type warning"))


# -- realistic data -----------------------------------------------------------------------------------

_TEMPLATES = (
    "{a} discharge pressure {p} bar, alarm {c} cleared after reset",
    "Replaced mechanical seal on {a}; vibration {v} mm/s, bearing temp {t}°C",
    "{a} tripped on {c}. Motor current {i} A at {rpm} rpm, restarted after {m} min",
    "Greased bearings on {a}, temp {t} °C, flow {f} L/min, no leaks found",
    "Operator reports noise at {a}, {v} mm/s axial, check coupling alignment",
    "{a} filter dP {p} bar high, changed element, {c} acknowledged",
    "Inspected {a} and {b}: OK. Ambient {t}C, supply {hz} Hz",
    "{a} outlet {t} degC, setpoint 85 degC, valve {b} at {pct}% open",
    "PM done on {a}: belts tensioned, {i} amps, {kw} kW, runtime {h} hrs",
    "Leak at flange of {a}, isolated via {b}, pressure dropped to {p} bar",
)
_ASSETS = ("P-101", "P-102A", "HX-12", "V-204", "M-33", "CV-1101", "K-7701", "FN-21", "TK-300", "C-45")
_CODES = ("E-042", "ALM-311", "F-17", "ERR-5001", "A-220", "E_107")


def make_notes(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """n (topic, payload) inbound notes, JSON {"id", "text"}: short maintenance notes with asset tags,
    alarm codes and measurements, spread over 4 lines' topics. Deterministic for a seed."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        text = rnd.choice(_TEMPLATES).format(
            a=rnd.choice(_ASSETS), b=rnd.choice(_ASSETS), c=rnd.choice(_CODES),
            p=round(rnd.uniform(0.5, 12), 1), v=round(rnd.uniform(0.5, 11), 1), t=rnd.randint(20, 95),
            i=round(rnd.uniform(5, 80), 1), rpm=rnd.choice((1450, 1480, 2950, 2980)), m=rnd.randint(2, 45),
            f=rnd.randint(20, 400), hz=rnd.choice((50, 60)), pct=rnd.randint(5, 100),
            kw=round(rnd.uniform(1, 90), 1), h=rnd.randint(100, 9000),
        )
        topic = f"plant/line{k % 4 + 1}/notes"
        out.append((topic, json.dumps({"id": f"wo-{seed}-{k}", "text": text}).encode()))
    return out


def make_results(n: int, seed: int = 2) -> list[tuple[str, str, bytes]]:
    """n (id, topic, payload) outbox rows exactly as the agent writes them: the patterns task run over
    make_notes(), encoded by edge_agent.results.result_payload (about 600-900 bytes each)."""
    from edge_agent.config import PatternsTaskConfig
    from edge_agent.message import Note
    from edge_agent.results import result_id, result_payload
    from edge_agent.tasks.patterns import PatternsTask
    from edge_agent.topics import output_topic

    task = PatternsTask("patterns", PatternsTaskConfig.model_validate({}))
    notes = make_notes(n, seed)
    rows = []
    now = time.time()
    for start in range(0, n, 256):
        chunk = notes[start : start + 256]
        decoded = [(topic, json.loads(p), p) for topic, p in chunk]
        outs = task.process([Note(text=d["text"], topic=t, input_id=d["id"], received_at=now) for t, d, _ in decoded])
        for (topic, d, raw), res in zip(decoded, outs, strict=True):
            out = output_topic("edge/results/{topic}", topic, "gw-bench")
            rid = result_id("gw-bench", topic, out, d["id"], raw)
            rows.append((rid, out, result_payload(rid=rid, input_id=d["id"], topic=topic, received_at=now,
                                                  text=d["text"], results={"patterns": res},
                                                  processed_at=now, gateway="gw-bench")))
    task.close()
    return rows


# Mosquitto 2.0.11 (Debian 12) does not hold to a client's Receive Maximum: every PUBACK releases a whole
# window of queued messages (measured: receive_maximum 256, ack one -> 256 more arrive). The agent's source
# blocks on a full queue (TCP back-pressure), so nothing is lost at the default 256, but the stop-and-go
# costs throughput (quick passthrough 0.62 at 256 vs 0.72 at 65535, same run conditions). Both sides of
# the comparison use the same receive maximum.
SOURCE_RECEIVE_MAXIMUM = 65535


def agent_config(path: Path, *, port: int, outbox: Path, level: str, source: dict[str, Any] | None = None,
                 sink: dict[str, Any] | None = None, tasks: tuple[str, ...] = ("patterns",),
                 task_tables: dict[str, Any] | None = None, pipeline: dict[str, Any] | None = None) -> Path:
    """The bench agent: one broker for source and sink, one route running `tasks` (default: the built-in
    patterns task; others declared in `task_tables`, the config's [tasks] table), the pipeline/sink defaults
    except session_expiry = 0, so that no source session outlives its round and soaks up the peer's notes,
    and receive_maximum = SOURCE_RECEIVE_MAXIMUM, as the relay's; `source`, `sink` and `pipeline` add settings
    (`sink={"port": U}` puts the sink on a second broker)."""
    cfg: dict[str, Any] = {
        "gateway_id": "gw-bench",
        "source": {"port": port, "session_expiry": 0, "receive_maximum": SOURCE_RECEIVE_MAXIMUM,
                   "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5, **(source or {})},
        "sink": {"port": port, "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5, **(sink or {})},
        "outbox": {"path": outbox},
        "log": {"level": level, "format": "json"},
        "routes": [{"topic": IN_FILTER, "text_field": "text", "id_field": "id", "output_topic": OUT_PREFIX + "{topic}",
                    "tasks": list(tasks)}],
    }
    if task_tables:
        cfg["tasks"] = task_tables
    if pipeline:
        cfg["pipeline"] = pipeline
    return write_toml(path, cfg)


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


# -- the parent's handle on a child ---------------------------------------------------------------------


class Child:
    """A bench child process: JSON events read from its stdout on a thread, stderr to a file."""

    def __init__(self, role: str, *args: str, log: Path, profile: Path | None = None,
                 module: str = "bench.common") -> None:
        cmd = [sys.executable, "-m", module, role, *args]  # cwd REPO: bench, tests and edge_agent import
        pyspy = os.environ.get("BENCH_PYSPY")
        if profile is not None and pyspy:
            Path(pyspy).mkdir(parents=True, exist_ok=True)
            cmd = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--threads",
                   "--format", "raw", "--rate", "200", *os.environ.get("BENCH_PYSPY_ARGS", "").split(),
                   "-o", str(Path(pyspy) / profile.name), "--", *cmd]
        self.role = role
        self.log = log
        self._err = log.open("ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     cwd=REPO, text=True, bufsize=1)
        self._events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self._events.put(json.loads(line))
        self._events.put({"event": "exited"})

    def expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                got = self._events.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise TimeoutError(f"{self.role}: no {event!r} within {timeout:.0f} s; log {self.log}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}") from None
            if got["event"] == event:
                return got
            if got["event"] == "exited":
                raise RuntimeError(f"{self.role} exited before {event!r}; log {self.log}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass

    def close(self, timeout: float = 30) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._err.close()


class Round:
    """Children of one round, all killed if the round fails."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def __enter__(self) -> Round:
        return self

    def spawn(self, role: str, *args: str, log: Path, profile: Path | None = None,
              module: str = "bench.common") -> Child:
        c = Child(role, *args, log=log, profile=profile, module=module)
        self.children.append(c)
        return c

    def __exit__(self, et: object, *_: object) -> None:
        for c in self.children:
            if et is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGKILL)
            c.stop()
        for c in self.children:
            c.close()


# -- the children -------------------------------------------------------------------------------------


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _wait_stop() -> None:
    for line in sys.stdin:
        if line.strip() == "stop":
            return


def _client(name: str, *, inflight: int = 20) -> mqtt.Client:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{os.getpid()}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    return c


def _connect(c: mqtt.Client, port: int, receive_maximum: int | None = None) -> None:
    props = None
    if receive_maximum is not None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_maximum
    c.connect("127.0.0.1", port, keepalive=30, properties=props)
    c.loop_start()


def child_consumer(a: argparse.Namespace) -> None:
    """Subscribe QoS 1 and count non-retained messages until `expect` arrived (or `timeout`)."""
    done = threading.Event()
    state: dict[str, float | None] = {"count": 0, "t_first": None, "t_last": None}

    def on_connect(c, _u, _f, _rc, _p=None) -> None:
        c.subscribe(a.topic, qos=1)

    def on_message(_c, _u, msg) -> None:
        if msg.retain:
            return
        now = time.monotonic()
        if state["t_first"] is None:
            state["t_first"] = now
        state["t_last"] = now
        count = state["count"] = (state["count"] or 0) + 1
        if count >= a.expect:
            done.set()

    c = _client("consumer")
    c.on_connect = on_connect
    c.on_subscribe = lambda *_: _emit("ready")
    c.on_message = on_message
    _connect(c, a.port)
    deadline = time.monotonic() + a.timeout
    while not done.wait(0.5) and time.monotonic() < deadline:
        last = state["t_last"]
        if last is not None and time.monotonic() - last > a.idle:
            break  # stalled: report what arrived rather than wait out the whole timeout
    _emit("done", **state)
    c.disconnect()
    c.loop_stop()


def _publish_all(port: int, msgs: list[tuple[str, bytes]], inflight: int) -> dict:
    """Connect, publish every message QoS 1 as fast as paho takes them, wait for every PUBACK."""
    acked = threading.Event()
    count = [0]
    n = len(msgs)

    def on_publish(*_a: object) -> None:
        count[0] += 1
        if count[0] >= n:
            acked.set()

    t_connect = time.monotonic()
    cpu0 = time.process_time()
    c = _client("publisher", inflight=inflight)
    c.on_publish = on_publish
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    _connect(c, port)
    connected.wait(10)
    t_first = time.monotonic()
    for topic, payload in msgs:
        c.publish(topic, payload, qos=1)
    t_queued = time.monotonic()
    ok = acked.wait(600)
    t_acked = time.monotonic()
    cpu_s = time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    return {"t_connect": t_connect, "t_first": t_first, "t_queued": t_queued, "t_acked": t_acked, "all_acked": ok,
            "cpu_s": cpu_s}


def child_publisher(a: argparse.Namespace) -> None:
    msgs = make_notes(a.n, a.seed)
    if a.texts:  # the same notes' topics and ids, with the texts of a JSON list (cycled)
        texts = json.loads(Path(a.texts).read_text())
        msgs = [(t, json.dumps({"id": json.loads(p)["id"], "text": texts[k % len(texts)]}).encode())
                for k, (t, p) in enumerate(msgs)]
    _emit("published", **_publish_all(a.port, msgs, a.inflight))


def child_rows(a: argparse.Namespace) -> None:
    """The drain peer: publish an outbox file's rows (same topics, same payload bytes), oldest first."""
    with sqlite3.connect(f"file:{a.db}?mode=ro", uri=True) as conn:
        msgs = conn.execute("SELECT topic, payload FROM outbox ORDER BY seq").fetchall()
    _emit("published", n=len(msgs), **_publish_all(a.port, msgs, a.inflight))


def child_relay(a: argparse.Namespace) -> None:
    """The passthrough peer: a plain paho relay. Subscribes IN_FILTER QoS 1 (paho acks each message when
    on_message returns) and republishes each message QoS 1 to OUT_PREFIX + topic: on the same client, or,
    with --uplink-port (a second broker, as the agent's sink), on a second client connected there."""
    c = _client("relay", inflight=a.inflight)
    out = c
    if a.uplink_port and a.uplink_port != a.port:
        out = _client("relay-out", inflight=a.inflight)
        up = threading.Event()
        out.on_connect = lambda *_: up.set()
        _connect(out, a.uplink_port)
        up.wait(10)
    relayed = [0]

    def on_message(_cl, _u, msg) -> None:
        out.publish(OUT_PREFIX + msg.topic, msg.payload, qos=1)
        relayed[0] += 1

    c.on_connect = lambda cl, *_: cl.subscribe(IN_FILTER, qos=1)
    c.on_subscribe = lambda *_: _emit("ready", cpu_s=time.process_time())
    c.on_message = on_message
    _connect(c, a.port, receive_maximum=a.receive_maximum)
    _wait_stop()
    cpu = time.process_time()
    for cl in {id(c): c, id(out): out}.values():
        cl.disconnect()
        cl.loop_stop()
    _emit("stopped", relayed=relayed[0], cpu_s=cpu)


def child_agent(a: argparse.Namespace) -> None:
    """The agent in-process (tests/kit's Running: Agent.run on a thread with a stop Event), logging through
    edge_agent.logs at the given level as JSON into log_file (e.g. /dev/null). "ready" once both connections
    are up (with --without-sink: the source alone, for an uplink that is down on purpose)."""
    from edge_agent import logs
    from tests.kit.agent import Running

    stream = open(a.log_file, "a")  # noqa: SIM115 - lives as long as the process
    logs.configure(a.log_level, "json", stream)
    t0 = time.monotonic()
    running = Running(a.config, wait=False, name="bench-agent")
    agent = running.agent
    _emit("started", t0=t0)
    up = wait_for(lambda: agent.source is not None and agent.source.connected.is_set()
                  and (a.without_sink or (agent.sink is not None and agent.sink.connected.is_set())),
                  timeout=30, interval=0.01)
    t_connected = time.monotonic()
    if a.settle:
        time.sleep(a.settle)  # the source's SUBSCRIBE is sent on connect; let the SUBACK land
    _emit("ready", t_connected=t_connected, up=up, cpu_s=time.process_time())
    if a.watch_replayed:
        threading.Thread(target=_watch_replayed, args=(agent, a.watch_replayed), daemon=True).start()
    _wait_stop()
    assert agent.pipeline is not None and agent.sink is not None and agent.source is not None
    fields = {"received": agent.source.received, "backpressure_waits": agent.source.backpressure,
              "source_reconnects": agent.source.reconnects, "processed": agent.pipeline.processed,
              "published": agent.sink.published,
              "replayed": agent.sink.replayed, "outbox_rows": agent.outbox.stats().count,
              "cpu_s": time.process_time()}
    running.stop(timeout=60)
    _emit("stopped", **fields)


def _watch_replayed(agent: Any, n: int) -> None:
    """Emit "replaying" when the sink hands its first replayed row to paho and "replayed" once it has handed
    n (polled every 5 ms): when the backlog lane ran, as seen from the agent, not from a consumer."""
    started = False
    while True:
        count = agent.sink.replayed
        if count and not started:
            started = True
            _emit("replaying", t=time.monotonic())
        if count >= n:
            _emit("replayed", t=time.monotonic(), n=count)
            return
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("consumer")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", default=OUT_FILTER)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--idle", type=float, default=15, help="give up this long after the last message")
    p.set_defaults(func=child_consumer)
    p = sub.add_parser("publisher")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--inflight", type=int, default=PUBLISHER_INFLIGHT)
    p.add_argument("--texts", type=Path, help="JSON list of note texts to send instead of generated ones")
    p.set_defaults(func=child_publisher)
    p = sub.add_parser("rows")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--inflight", type=int, default=64)
    p.set_defaults(func=child_rows)
    p = sub.add_parser("relay")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--receive-maximum", type=int, default=SOURCE_RECEIVE_MAXIMUM)
    p.add_argument("--uplink-port", type=int, help="publish to this broker (default: the one at --port)")
    p.set_defaults(func=child_relay)
    p = sub.add_parser("agent")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--log-file", default=os.devnull)
    p.add_argument("--settle", type=float, default=0.0)
    p.add_argument("--without-sink", action="store_true", help="ready without waiting for the uplink")
    p.add_argument("--watch-replayed", type=int, default=0, help="report when the sink replayed this many rows")
    p.set_defaults(func=child_agent)
    a = ap.parse_args(argv)
    a.func(a)


def rounds_of(sides: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """Alternate the sides, rotating who goes first each round, so that neither always runs warm."""
    for r in range(rounds):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:
            yield r, side


if __name__ == "__main__":
    main()
