"""Messages per second through the agent, end to end, against a plain paho relay on the same broker.

One Mosquitto (bench settings, see common.BROKER_SETTINGS). Each round starts a consumer (QoS 1 on edge/results/#),
then the system under test, then a publisher that sends N notes QoS 1 as fast as paho takes them
(inflight common.PUBLISHER_INFLIGHT). rate = N / (consumer's last receipt - publisher's first send). Same N, publisher,
consumer and broker for both sides; each in its own process.

- ours: edge_agent.agent.Agent in-process in a child (source QoS 1 manual ack → decode → built-in
  "patterns" task on one route → SQLite outbox, WAL + synchronous=FULL, in a temp dir on the repo's disk →
  sink QoS 1, inflight 64), all pipeline/sink defaults. Logging at "warning" (the per-message line is
  off), and again at "info" as JSON into /dev/null (the per-message line is built and rendered).
- peer: one paho client that subscribes plant/+/notes QoS 1 (Receive Maximum as the agent's source)
  and republishes each message from on_message QoS 1 (inflight 64, as the agent's sink). No decoding, no
  disk: the cost of MQTT in and out in Python, which the agent cannot beat.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import (
    BROKER_SETTINGS,
    PUBLISHER_INFLIGHT,
    SOURCE_RECEIVE_MAXIMUM,
    Round,
    agent_config,
    bench_broker,
    median,
    rounds_of,
)
from tests.kit import REPO
from tests.kit.broker import Broker

ROUNDS = 3
SIDES = ["ours_warning", "ours_info", "peer"]


def _one(side: str, r: int, broker: Broker, work: Path, n: int) -> tuple[float, dict]:
    tag = f"{side}-r{r}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with Round() as rd:
        consumer = rd.spawn("consumer", "--port", str(broker.port), "--expect", str(n), log=logs / f"{tag}.consumer")
        if side == "peer":
            sut = rd.spawn("relay", "--port", str(broker.port), log=logs / f"{tag}.relay",
                           profile=Path(f"{tag}.txt"))
        else:
            level = side.removeprefix("ours_")
            cfg = agent_config(work / f"{tag}.toml", port=broker.port, outbox=work / f"{tag}.db", level=level)
            log_file = os.devnull if level == "info" else str(logs / f"{tag}.agentlog")
            sut = rd.spawn("agent", "--config", str(cfg), "--log-level", level, "--log-file", log_file,
                           "--settle", "0.5", log=logs / f"{tag}.agent", profile=Path(f"{tag}.txt"))
        consumer.expect("ready", 30)
        ready = sut.expect("ready", 60)
        pub = rd.spawn("publisher", "--port", str(broker.port), "--n", str(n), log=logs / f"{tag}.publisher")
        sent = pub.expect("published", 300)
        got = consumer.expect("done", 300)
        sut.stop()
        stats = sut.expect("stopped", 60)
    if got["count"] < n:
        raise RuntimeError(f"{tag}: consumer got {got['count']} of {n}")
    elapsed = got["t_last"] - sent["t_first"]
    # CPU of the system under test (all its threads, between ready and stop) per message: steadier than the
    # rate on a small box where the publisher, consumer and broker compete for the same cores.
    cpu_us = (stats.pop("cpu_s") - ready["cpu_s"]) / n * 1e6
    stats.pop("event", None)
    return n / elapsed, {"cpu_us_per_msg": round(cpu_us, 1), "publish_s": round(sent["t_acked"] - sent["t_first"], 3),
                         **stats}


def run(quick: bool) -> list[dict]:
    n = 5000 if quick else 20000
    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    detail: dict[str, list[dict]] = {s: [] for s in SIDES}
    # Under /tmp: the same filesystem as the repo here (checked below); the outbox fsyncs land on that disk.
    with tempfile.TemporaryDirectory(prefix="bench-passthrough-") as tmp:
        work = Path(tmp)
        same_disk = os.stat(work).st_dev == os.stat(REPO).st_dev
        with bench_broker(work / "broker") as broker:
            for r, side in rounds_of(SIDES, ROUNDS):
                rate, info = _one(side, r, broker, work, n)
                rates[side].append(round(rate, 1))
                detail[side].append(info)
    peer = median(rates["peer"])
    common = {
        "unit": "msg/s",
        "peer_name": "paho→paho relay (one client: sub QoS1 receive-max "
                     f"{SOURCE_RECEIVE_MAXIMUM} → on_message → pub QoS1 inflight 64)",
        "n": n,
        "stat": f"median of {ROUNDS} alternating rounds (order rotated each round), same broker, same process run",
        "measure": "N / (consumer's last result - publisher's first send); publisher QoS1 inflight "
                   f"{PUBLISHER_INFLIGHT}, "
                   "consumer QoS1 on edge/results/#, each side in its own process",
        "broker": "mosquitto 2.0.11, " + ", ".join(BROKER_SETTINGS),
        "agent": "1 route, built-in patterns task; outbox WAL synchronous=FULL"
                 f"{' on the repo disk' if same_disk else ' (temp dir NOT on the repo disk)'}; "
                 "config defaults (batch_max 256, batch_wait_ms 20, sink inflight 64) except source "
                 f"session_expiry 0 and receive_maximum {SOURCE_RECEIVE_MAXIMUM} (as the relay's)",
        "samples_peer": rates["peer"],
        "peer_cpu_us_per_msg": median([d["cpu_us_per_msg"] for d in detail["peer"]]),
        "cores": os.cpu_count(),
        # Other work on the machine moves the rates a lot (the CPU per message much less): say how busy it was.
        "load_avg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }

    def cpu(side: str) -> float:
        return median([d["cpu_us_per_msg"] for d in detail[side]])

    return [
        {"name": "passthrough", "ours": median(rates["ours_warning"]), "peer": peer, **common,
         "log": "level warning (per-message info line off)", "samples_ours": rates["ours_warning"],
         "ours_cpu_us_per_msg": cpu("ours_warning"), "agent_counters": detail["ours_warning"][-1]},
        {"name": "passthrough_log_info", "ours": median(rates["ours_info"]), "peer": peer, **common,
         "log": "level info, JSON to /dev/null (one line per message rendered)", "samples_ours": rates["ours_info"],
         "ours_cpu_us_per_msg": cpu("ours_info"), "agent_counters": detail["ours_info"][-1]},
    ]
