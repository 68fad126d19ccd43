"""Soak: the daemon at a steady rate for a long time, with the uplink failing every few minutes; does its
memory stay flat, and does every note arrive?

    python -m bench.soak [--duration 3600] [--rate 100] [--json OUT]
    python bench/run.py soak [--quick] --json OUT       # --quick: 90 s; else 3600 s

Parts: a source Mosquitto and an uplink Mosquitto (bench settings, common.bench_broker); the agent as the real
daemon (`python -m edge_agent run`, its own process, built-in patterns task, sink keepalive 5 s) whose
sink reaches the uplink through the chaos suite's FaultProxy; a producer (unique ids, QoS 1, fixed rate)
and a consumer (QoS 1 on edge/results/#) in this process. Every `every` seconds the uplink goes away for
a quarter of that, alternately refused (RST + connection refused) and blackholed (silent: only the sink's
keepalive notices), then heals; the backlog is replayed while live results keep flowing.

Measured: the agent's VmRSS (/proc/PID/status) every `--sample` seconds. Growth = last sample (after the
final drain) over the first sample after warm-up (the first outage healed and drained, so the SQLite
page cache, paho's buffers and the replay path have all been exercised once), in percent; target < 5 %.
Also the least-squares slope over the post-warm-up samples (KiB per hour), the agent's CPU, and the
producer's sent (broker-acknowledged), the consumer's unique results, duplicates and lost.

No peer: the figure is our own process's growth against an absolute target. A plain paho relay is not a
like-for-like baseline here: it holds no backlog through an outage (it loses those notes), so its memory
does not do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import IN_FILTER, OUT_FILTER, OUT_PREFIX, bench_broker, make_notes
from tests.kit import wait_for
from tests.kit.agent import AgentProcess
from tests.kit.config import write_toml
from tests.kit.proxy import FaultProxy

QUICK_S, FULL_S = 90, 3600


def _config(path: Path, *, source: int, sink: int, outbox: Path) -> Path:
    link = {"keepalive": 5, "reconnect_min_delay": 0.1, "reconnect_max_delay": 1.0}
    return write_toml(path, {
        "gateway_id": "gw-soak",
        "source": {"port": source, **link},
        "sink": {"port": sink, **link},
        "outbox": {"path": outbox},
        "log": {"level": "warning", "format": "json"},
        "routes": [{"topic": IN_FILTER, "text_field": "text", "id_field": "id", "output_topic": OUT_PREFIX + "{topic}",
                    "tasks": ["patterns"]}],
    })


def _client(name: str):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{name}-{os.getpid()}",
                    protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(0.1, 1.0)
    return c


class Producer:
    """Notes from common.make_notes, ids made unique per send, at a fixed rate (catching up after stalls)."""

    def __init__(self, port: int, rate: float) -> None:
        self.rate, self.sent, self.acked = rate, 0, 0
        self._notes = make_notes(1000, seed=7)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.c = _client("producer")
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_publish(self, *_a: object) -> None:
        with self._lock:
            self.acked += 1

    def _run(self) -> None:
        t_next = time.monotonic()
        while not self._stop.is_set():
            topic, payload = self._notes[self.sent % len(self._notes)]
            note = json.loads(payload)
            note["id"] = f"soak-{self.sent}"
            self.c.publish(topic, json.dumps(note), qos=1)
            self.sent += 1
            t_next += 1 / self.rate
            self._stop.wait(max(0.0, t_next - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        wait_for(lambda: self.acked >= self.sent, 60, 0.1)
        self.c.disconnect()
        self.c.loop_stop()


class Consumer:
    def __init__(self, port: int) -> None:
        self.ids: set[str] = set()
        self.count = 0
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.probed = threading.Event()
        self.c = _client("consumer")
        self.c.on_connect = lambda c, *_: c.subscribe(OUT_FILTER, qos=1)
        self.c.on_subscribe = lambda *_: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()

    def _on_message(self, _c, _u, msg) -> None:
        if msg.retain:
            return
        input_id = json.loads(msg.payload)["input_id"]
        if input_id == "probe":
            self.probed.set()
            return
        with self._lock:
            self.ids.add(input_id)
            self.count += 1

    def unique(self) -> int:
        with self._lock:
            return len(self.ids)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _wait_ready(port: int, consumer: Consumer, agent: AgentProcess) -> None:
    """Probe notes until one comes out the other end: the agent's source session exists and its sink is
    up, so that no measured note meets a broker with no subscriber yet."""
    c = _client("probe")
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    try:
        deadline = time.monotonic() + 60
        while not consumer.probed.wait(0.5):
            if not agent.alive() or time.monotonic() > deadline:
                raise RuntimeError("the agent did not come up")
            c.publish("plant/probe/notes", json.dumps({"id": "probe", "text": "probe"}), qos=1)
    finally:
        c.disconnect()
        c.loop_stop()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _slope_kb_per_h(samples: list[tuple[float, int]]) -> float:
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mk = sum(k for _, k in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (k - mk) for t, k in samples) / var * 3600 if var else 0.0


def schedule(duration: float) -> tuple[float, float, float]:
    """(every, outage, warm-up end) in seconds: about ten outages per run, each a quarter of its period;
    warm-up ends once the first outage has healed and its backlog has drained."""
    every = min(max(duration / 10, 30.0), 300.0)
    outage = every / 4
    return every, outage, every / 2 + outage + 15


def soak(duration: float, rate: float, sample_s: float, work: Path, log=print) -> dict:
    every, outage_s, warmup = schedule(duration)
    with (bench_broker(work / "source") as source, bench_broker(work / "uplink") as uplink,
          FaultProxy(uplink.port) as proxy):
        consumer = Consumer(uplink.port)
        consumer.ready.wait(10)
        cfg = _config(work / "agent.toml", source=source.port, sink=proxy.port, outbox=work / "outbox.db")
        agent = AgentProcess(cfg, work / "agent.log").start()
        assert agent.proc is not None
        pid = agent.proc.pid
        try:
            _wait_ready(source.port, consumer, agent)
            producer = Producer(source.port, rate)
            t0 = time.monotonic()
            cpu0 = _cpu_s(pid)
            samples: list[tuple[float, int]] = []
            outages = {"refused": 0, "blackholed": 0}
            starts = [every / 2 + i * every for i in range(int(duration // every) + 1)]
            starts = [s for s in starts if s + outage_s < duration - 10]  # the run ends with the uplink up
            k, down = 0, False
            next_sample = 0.0
            while (t := time.monotonic() - t0) < duration:
                want_down = any(s <= t < s + outage_s for s in starts)
                if want_down and not down:
                    kind = "refused" if k % 2 == 0 else "blackholed"
                    proxy.refuse() if kind == "refused" else proxy.blackhole()
                    outages[kind] += 1
                    k, down = k + 1, True
                elif down and not want_down:
                    proxy.heal()
                    down = False
                if t >= next_sample:
                    if not agent.alive():
                        raise RuntimeError(f"the agent exited ({agent.proc.returncode}); see {work / 'agent.log'}")
                    samples.append((round(t, 1), _rss_kb(pid)))
                    log(f"t={t:6.0f}s rss={samples[-1][1]} KiB sent={producer.sent} "
                        f"received={consumer.unique()} uplink={'down' if down else 'up'}")
                    next_sample += sample_s
                time.sleep(0.2)
            if down:
                proxy.heal()
            producer.stop()
            drained = wait_for(lambda: consumer.unique() >= producer.acked, 120, 0.5)
            samples.append((round(time.monotonic() - t0, 1), _rss_kb(pid)))
            cpu_s = _cpu_s(pid) - cpu0
            elapsed = time.monotonic() - t0
        finally:
            rc = agent.kill(signal.SIGTERM, timeout=60)
            consumer.close()
    post = [s for s in samples if s[0] >= warmup]
    first, last = post[0][1], samples[-1][1]
    return {
        "rss_first_kb": first, "rss_last_kb": last, "rss_max_kb": max(k for _, k in samples),
        "growth_pct": round((last - first) / first * 100, 2),
        "slope_kib_per_h": round(_slope_kb_per_h(post), 1),
        "sent": producer.acked, "received_unique": consumer.unique(),
        "duplicates": consumer.count - consumer.unique(), "lost": producer.acked - consumer.unique(),
        "drained": drained, "agent_exit": rc, "outages": outages,
        "agent_cpu_pct": round(cpu_s / elapsed * 100, 1),
        "schedule_s": {"every": every, "outage": outage_s, "warmup": warmup},
        "samples": samples,
    }


def run(quick: bool, duration: float | None = None, rate: float = 100.0, sample_s: float = 5.0) -> list[dict]:
    duration = duration or (QUICK_S if quick else FULL_S)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        r = soak(duration, rate, sample_s, Path(tmp), log=lambda s: print(s, file=sys.stderr, flush=True))
    return [{
        "name": "soak_rss_growth", "ours": r.pop("growth_pct"), "peer": None, "ratio": None,
        "unit": "% VmRSS growth, first post-warm-up sample to the end (target < 5)",
        "duration_s": duration, "rate_msg_s": rate, "cores": os.cpu_count(),
        "peer_name": "none: our process's growth against an absolute target (a relay holds no backlog)",
        **r,
    }]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=FULL_S, help="seconds (default 3600; 90 for a quick look)")
    ap.add_argument("--rate", type=float, default=100.0, help="notes per second")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rows = run(False, a.duration, a.rate, a.sample)
    text = json.dumps(rows, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    return 0 if rows[0]["lost"] == 0 and rows[0]["agent_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
