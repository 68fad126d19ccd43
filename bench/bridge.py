"""Store and forward: the agent (patterns route) against Mosquitto's own bridge, what a plant would pick to
get `plant/#` to an uplink broker. Same brokers, same stream; forwarding msg/s, and messages lost across an
uplink outage and across a SIGKILL of the forwarder.

    python bench/run.py bridge [--quick] --json OUT

Both sides: the plant publishes QoS 1 to a LOCAL Mosquitto; the forwarder gets each message to the UPLINK
Mosquitto, where a QoS 1 consumer records it. The local broker has the same settings on both sides (persistence
true, autosave_interval 1, deep queues); on the peer's side it is also the forwarder:
- peer: the local broker bridges `topic plant/# out 1` to the uplink (`cleansession false`, MQTT 3.1.1,
  keepalive 5 s, restart_timeout 1 s, `notifications false`): messages queued for the bridge live in the
  broker's memory and in its persistence file, written every autosave_interval (PEER_AUTOSAVE);
- ours: edge-agent (one route plant/+/notes, built-in patterns task; source session_expiry 3600 so that the
  local broker queues for it while it is down; outbox WAL synchronous=FULL; sink to the uplink) publishing
  each note's result to edge/results/plant/... The agent does more per message (extraction, a JSON result
  of ~700 bytes instead of the ~150-byte note, a commit before each ack).

Rows:
- `bridge/forward_msg_per_s`: N notes published as fast as paho takes them (inflight 100); rate =
  N / (consumer's last receipt - publisher's first send); best of ROUNDS alternating rounds. CPU per
  message of the forwarding processes (peer: the local broker; ours: local broker + agent), from
  /proc/PID/stat, the figure other load disturbs least.
- `bridge/lost_uplink_outage`, `bridge/lost_sigkill`, (full run) `bridge/lost_sigkill_online`: a steady stream
  (RATE msg/s, unique ids) for SECONDS; the uplink link goes through an in-process TCP proxy
  (tests/kit/proxy.py) that is refused (every link RST, no new connection) for the outage. sigkill: during
  an uplink outage (the store-and-forward case: a backlog is held), the forwarder is SIGKILLed (peer: the
  bridging broker; ours: the agent) and restarted 1 s later; sigkill_online: the same with the uplink up.
  Afterwards the stream stops and the run waits until the consumer has everything or a probe sent after the
  stream has come through (+ DRAIN_GRACE s). lost = ids PUBACKed by the local broker that never reached the
  consumer: exact counts, independent of the machine's load. `ours`/`peer` are the lost counts (lower is
  better; `ratio` is null).
  `bridge/lost_local_broker_sigkill` (ours only; for the peer it is the same process as the forwarder): the
  local broker SIGKILLed during the outage instead of the agent.

    python -m bench.bridge stream|collect ...   (children, internal)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BROKER_SETTINGS,
    OUT_FILTER,
    Child,
    Peer,
    Round,
    _client,
    _emit,
    _wait_stop,
    agent_config,
    bench_broker,
    make_notes,
)
from tests.kit import wait_for
from tests.kit.agent import AgentProcess
from tests.kit.broker import MOSQUITTO, Broker, free_port
from tests.kit.proxy import FaultProxy

ROUNDS = 3
PEER_AUTOSAVE = 1  # seconds: the most a plant would ask of Mosquitto (its default is 1800)
LOCAL_SETTINGS = (
    "persistence true",
    f"autosave_interval {PEER_AUTOSAVE}",
    "max_inflight_messages 0",
    "max_queued_messages 1000000",
    "max_queued_bytes 0",
    "set_tcp_nodelay true",
    "log_type error",
    "log_type warning",
    "log_type notice",
)
DRAIN_GRACE = 2.0  # s after the probe that ends a drain


def peers() -> list[Peer]:
    return [Peer("mosquitto (broker and its bridge: the peer of bridge)", path=MOSQUITTO)]


# -- children -------------------------------------------------------------------------------------------


def child_stream(a: argparse.Namespace) -> None:
    """Publish QoS 1 at a fixed rate with unique ids (b-0, b-1, ...) for a.seconds, reconnecting as paho does
    (unacked messages are sent again after a reconnect); then wait for the PUBACKs. Writes the ids the local
    broker PUBACKed to a.out."""
    notes = make_notes(int(a.rate * a.seconds) + 1, seed=5)
    infos: list[tuple[str, Any]] = []  # (id, MQTTMessageInfo): is_published() once the PUBACK came

    c = _client("stream", inflight=100)
    c.reconnect_delay_set(0.1, 0.5)
    c.connect_async("127.0.0.1", a.port, keepalive=10)
    c.loop_start()
    wait_for(c.is_connected, timeout=10)
    _emit("started", t=time.monotonic())
    t0 = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - t0 < a.seconds:
        due = min(int((now - t0) * a.rate) + 1, len(notes))
        while sent < due:
            topic, payload = notes[sent]
            ident = f"b-{sent}"
            payload = json.dumps({"id": ident, "text": json.loads(payload)["text"]}).encode()
            infos.append((ident, c.publish(topic, payload, qos=1)))
            sent += 1
        time.sleep(0.005)
    # info._published, not is_published(): that raises for a message published while disconnected (rc
    # NO_CONN), which paho still queues, sends after the reconnect and marks published on its PUBACK.
    wait_for(lambda: all(info._published for _, info in infos), timeout=a.ack_timeout, interval=0.1)
    acked = [ident for ident, info in infos if info._published]
    c.disconnect()
    c.loop_stop()
    Path(a.out).write_text(json.dumps(acked))
    _emit("done", sent=sent, acked=len(acked), t=time.monotonic())


def child_collect(a: argparse.Namespace) -> None:
    """Subscribe a.topic QoS 1 on the uplink and record every id (`input_id` of a result, `id` of a note):
    progress events every 0.5 s; on "stop", the ids (and how many arrived more than once) to a.out."""
    seen: dict[str, int] = {}
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_message(_c, _u, msg) -> None:
        try:
            d = json.loads(msg.payload)
            ident = d.get("input_id") or d.get("id")
        except (ValueError, AttributeError):
            return
        if not isinstance(ident, str) or not ident.startswith("b-"):
            return  # a probe
        with lock:
            seen[ident] = seen.get(ident, 0) + 1
            last[0] = time.monotonic()

    c = _client("collect", inflight=20)
    c.on_connect = lambda cl, *_: cl.subscribe(a.topic, qos=1)
    c.on_subscribe = lambda *_: _emit("ready")
    c.on_message = on_message
    c.connect("127.0.0.1", a.port)
    c.loop_start()
    stop = threading.Event()

    def progress() -> None:
        while not stop.wait(0.5):
            with lock:
                _emit("progress", unique=len(seen), idle_s=round(time.monotonic() - last[0], 2))

    threading.Thread(target=progress, daemon=True).start()
    _wait_stop()
    stop.set()
    c.disconnect()
    c.loop_stop()
    with lock:
        Path(a.out).write_text(json.dumps(sorted(seen)))
        _emit("stopped", unique=len(seen), duplicates=sum(n - 1 for n in seen.values()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("stream")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--ack-timeout", type=float, default=60)
    p.add_argument("--out", required=True)
    p.set_defaults(func=child_stream)
    p = sub.add_parser("collect")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=child_collect)
    a = ap.parse_args(argv)
    a.func(a)


# -- the parent -----------------------------------------------------------------------------------------


def _bridge_settings(uplink_port: int) -> tuple[str, ...]:
    return (*LOCAL_SETTINGS,
            "connection uplink", f"address 127.0.0.1:{uplink_port}", "topic plant/# out 1",
            "cleansession false", "clientid bench-bridge", "bridge_protocol_version mqttv311",
            "keepalive_interval 5", "restart_timeout 1 2", "notifications false", "start_type automatic")


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_path(local: int, uplink: int, out_filter: str, timeout: float = 90) -> None:
    """Probe notes into the local broker until one comes out at the uplink: the forwarder is connected and
    subscribed end to end (a note published before that would be dropped, not lost in transit)."""
    got = threading.Event()
    col, pub = _client("probe-in"), _client("probe-out")  # clean start, no session left behind
    col.on_connect = lambda cl, *_: cl.subscribe(out_filter, qos=1)
    col.on_message = lambda *_: got.set()
    col.connect("127.0.0.1", uplink)
    col.loop_start()
    pub.connect("127.0.0.1", local)
    pub.loop_start()
    try:
        deadline = time.monotonic() + timeout
        k = 0
        while not got.wait(0.3):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no probe through {local} -> {uplink} within {timeout:.0f} s")
            pub.publish("plant/probe/notes", json.dumps({"id": f"probe-{k}", "text": "probe P-1"}), qos=1)
            k += 1
    finally:
        for c in (pub, col):
            c.disconnect()
            c.loop_stop()


class _Side:
    """One side's forwarder on a local broker: start, SIGKILL, restart."""

    def __init__(self, side: str, work: Path, uplink_port: int) -> None:
        self.side, self.work = side, work
        self.local_port = free_port()
        settings = _bridge_settings(uplink_port) if side == "peer" else LOCAL_SETTINGS
        self.local = Broker(work / "local", port=self.local_port, settings=settings)
        self.out_filter = "plant/#" if side == "peer" else OUT_FILTER
        self.agent: AgentProcess | None = None
        self.cfg = None
        if side == "ours":
            self.cfg = agent_config(work / "agent.toml", port=self.local_port, outbox=work / "outbox.db",
                                    level="warning", source={"session_expiry": 3600},
                                    sink={"port": uplink_port})

    def start(self) -> None:
        self.local.start()
        if self.side == "ours":
            self.start_agent()

    def start_agent(self) -> None:
        assert self.cfg is not None
        self.agent = AgentProcess(self.cfg, self.work / "agent.log").start()

    def kill_forwarder(self) -> None:
        if self.side == "peer":
            self.kill_local()
        else:
            assert self.agent is not None
            self.agent.kill(signal.SIGKILL)

    def restart_forwarder(self) -> None:
        if self.side == "peer":
            self.local.start()
        else:
            self.start_agent()

    def kill_local(self) -> None:
        self.local.stop(signal.SIGKILL)

    def close(self) -> None:
        if self.agent is not None and self.agent.alive():
            self.agent.kill(signal.SIGTERM)
        self.local.stop()


def _latest(child: Child, event: str) -> dict | None:
    """The newest queued `event` of a child (older ones dropped), without waiting."""
    got = None
    while True:
        try:
            e = child._events.get_nowait()
        except queue.Empty:
            return got
        if e["event"] == event:
            got = e
        elif e["event"] == "exited":
            raise RuntimeError(f"{child.role} exited; log {child.log}")


def _fault_round(side: str, scenario: str, uplink: Broker, work: Path, rate: float, seconds: float,
                 plan: list[tuple[float, str]]) -> dict[str, Any]:
    """One scenario on one side: returns sent/acked/received/lost/duplicates."""
    work.mkdir(parents=True)
    with FaultProxy(uplink.port) as proxy:
        s = _Side(side, work, proxy.port)
        s.start()
        try:
            _wait_path(s.local_port, uplink.port, s.out_filter)
            actions: dict[str, Callable[[], Any]] = {
                "outage": proxy.refuse, "heal": proxy.heal, "kill": s.kill_forwarder,
                "restart": s.restart_forwarder, "kill_local": s.kill_local, "restart_local": s.local.start}
            with Round() as rd:
                col = rd.spawn("collect", "--port", str(uplink.port), "--topic", s.out_filter,
                               "--out", str(work / "received.json"), log=work / "collect.log", module="bench.bridge")
                col.expect("ready", 30)
                stream = rd.spawn("stream", "--port", str(s.local_port), "--rate", str(rate), "--seconds",
                                  str(seconds), "--ack-timeout", "60", "--out", str(work / "acked.json"),
                                  log=work / "stream.log", module="bench.bridge")
                t0 = stream.expect("started", 30)["t"]
                done_actions = []
                for at, what in plan:
                    time.sleep(max(0.0, t0 + at - time.monotonic()))
                    actions[what]()
                    done_actions.append((round(time.monotonic() - t0, 2), what))
                published = stream.expect("done", seconds + 120)
                acked = set(json.loads((work / "acked.json").read_text()))
                t_drain = time.monotonic()
                # Drained when the consumer has every acked id, or when a probe published after the stream
                # has come through (both forwarders keep order: whatever is still missing then is lost),
                # plus DRAIN_GRACE for stragglers on other topics.
                last: list[dict] = []

                def complete() -> bool:
                    p = _latest(col, "progress")
                    if p is not None:
                        last[:] = [p]
                    return bool(last) and last[0]["unique"] >= len(acked)

                if not wait_for(complete, timeout=3, interval=0.2):
                    _wait_path(s.local_port, uplink.port, s.out_filter, timeout=180)
                    time.sleep(DRAIN_GRACE)
                col.stop()
                got = col.expect("stopped", 30)
        finally:
            s.close()
    received = set(json.loads((work / "received.json").read_text()))
    return {"sent": published["sent"], "acked_by_local_broker": len(acked), "received_unique": len(received),
            "lost": len(acked - received), "duplicates": got["duplicates"],
            "unacked_at_end": published["sent"] - len(acked), "actions_at_s": done_actions,
            "drain_s": round(time.monotonic() - t_drain, 1)}


def _throughput_round(side: str, uplink: Broker, work: Path, n: int) -> dict[str, float]:
    work.mkdir(parents=True)
    s = _Side(side, work, uplink.port)
    s.local.start()
    try:
        with Round() as rd:
            agent = None
            if side == "ours":
                agent = rd.spawn("agent", "--config", str(s.cfg), "--settle", "0.5", log=work / "agent.child")
                agent.expect("ready", 120)
            _wait_path(s.local_port, uplink.port, s.out_filter)
            consumer = rd.spawn("consumer", "--port", str(uplink.port), "--topic", s.out_filter, "--expect", str(n),
                                log=work / "consumer.log")
            consumer.expect("ready", 30)
            assert s.local.proc is not None
            cpu0 = _cpu_s(s.local.proc.pid) + (_cpu_s(agent.proc.pid) if agent else 0.0)
            pub = rd.spawn("publisher", "--port", str(s.local_port), "--n", str(n), log=work / "publisher.log")
            sent = pub.expect("published", 300)
            got = consumer.expect("done", 300)
            cpu1 = _cpu_s(s.local.proc.pid) + (_cpu_s(agent.proc.pid) if agent else 0.0)
            if agent is not None:
                agent.stop()
                agent.expect("stopped", 60)
    finally:
        s.close()
    if got["count"] < n:
        raise RuntimeError(f"bridge throughput {side}: consumer got {got['count']} of {n}")
    return {"msg_per_s": round(n / (got["t_last"] - sent["t_first"]), 1),
            "cpu_us_per_msg": round((cpu1 - cpu0) / n * 1e6, 1)}


def run(quick: bool) -> list[dict]:
    from bench.common import rounds_of

    n = 3000 if quick else 20000
    rate, seconds = (200.0, 14.0) if quick else (500.0, 40.0)
    # (scenario, plan: seconds after the stream's start -> action); outage and kill scaled to the run
    f = seconds / 14.0
    scenarios: list[tuple[str, list[tuple[float, str]], tuple[str, ...]]] = [
        ("uplink_outage", [(3 * f, "outage"), (9 * f, "heal")], ("ours", "peer")),
        ("sigkill", [(3 * f, "outage"), (6 * f, "kill"), (7 * f, "restart"), (9 * f, "heal")], ("ours", "peer")),
    ]
    if not quick:
        scenarios += [("sigkill_online", [(5 * f, "kill"), (6 * f, "restart")], ("ours", "peer")),
                      ("local_broker_sigkill", [(3 * f, "outage"), (6 * f, "kill_local"), (7 * f, "restart_local"),
                                                (9 * f, "heal")], ("ours",))]
    load0 = os.getloadavg()
    tput: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}
    faults: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        work = Path(tmp)
        with bench_broker(work / "uplink") as uplink:
            rounds = 1 if quick else ROUNDS
            for r, side in rounds_of(["ours", "peer"], rounds):
                tput[side].append(_throughput_round(side, uplink, work / f"tput-{side}-r{r}", n))
            for name, plan, sides in scenarios:
                for side in sides:
                    faults.setdefault(name, {})[side] = _fault_round(side, name, uplink, work / f"{name}-{side}",
                                                                     rate, seconds, plan)
    best = {side: max(rs, key=lambda x: x["msg_per_s"]) for side, rs in tput.items()}
    common = {
        "peer_name": f"mosquitto bridge (local broker: topic plant/# out 1, cleansession false, persistence, "
                     f"autosave_interval {PEER_AUTOSAVE})",
        "ours_name": "edge-agent, patterns route, outbox synchronous=FULL, sink QoS 1",
        "local_broker": "mosquitto, " + ", ".join(s for s in LOCAL_SETTINGS if not s.startswith("log_")),
        "uplink_broker": "mosquitto, " + ", ".join(BROKER_SETTINGS),
        "load_avg_start_end": [[round(x, 2) for x in load0], [round(x, 2) for x in os.getloadavg()]],
    }
    rows: list[dict[str, Any]] = [{
        "name": "bridge/forward_msg_per_s", "unit": "msg/s", "ours": best["ours"]["msg_per_s"],
        "peer": best["peer"]["msg_per_s"], "n": n, "stat": f"best of {rounds} alternating rounds",
        "ours_rounds": [x["msg_per_s"] for x in tput["ours"]], "peer_rounds": [x["msg_per_s"] for x in tput["peer"]],
        "ours_cpu_us_per_msg": best["ours"]["cpu_us_per_msg"], "peer_cpu_us_per_msg": best["peer"]["cpu_us_per_msg"],
        "cpu_of": "ours: local broker + agent; peer: the bridging local broker (utime+stime, /proc)", **common}]
    for name, by_side in faults.items():
        rows.append({"name": f"bridge/lost_{name}", "unit": "messages lost (lower is better)",
                     "ours": by_side["ours"]["lost"], "peer": by_side["peer"]["lost"] if "peer" in by_side else None,
                     "ratio": None, "rate_msg_per_s": rate, "stream_s": seconds,
                     "plan_s": dict((w, round(t, 1)) for t, w in next(p for s, p, _ in scenarios if s == name)),
                     "ours_detail": by_side["ours"], "peer_detail": by_side.get("peer"), **common})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
