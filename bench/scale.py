"""Aggregate notes per second through 1, 2 and 3 agents sharing one MQTT 5 shared subscription.

One Mosquitto (bench settings, see common.BROKER_SETTINGS). Each round starts a consumer (QoS 1 on edge/results/#),
then K agents, each its own process and outbox, all with `source.share_group = "bench"` and their own
client ids, then a publisher that sends N notes QoS 1 (inflight common.PUBLISHER_INFLIGHT).
rate = N / (consumer's last receipt - publisher's first send).

- ours: K = 2 and K = 3 agents (built-in patterns task, config as common.agent_config).
- peer: K = 1, the same single agent in the same share group, in the same run.

The machine this was written on has 2 cores shared by the broker, the publisher, the consumer and the
agents: K agents cannot run K times as fast there, and the ratio says how much of the second core the
extra members win. On a gateway with more cores than agents the ratio is the figure to watch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import BROKER_SETTINGS, PUBLISHER_INFLIGHT, Round, agent_config, bench_broker, median, rounds_of
from tests.kit.broker import Broker

SIDES = ["1", "2", "3"]


def _member(path: Path, *, port: int, outbox: Path, client_id: str) -> Path:
    return agent_config(path, port=port, outbox=outbox, level="warning",
                        source={"share_group": "bench", "client_id": client_id})


def _one(k: int, r: int, broker: Broker, work: Path, n: int) -> tuple[float, list[dict]]:
    tag = f"k{k}-r{r}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with Round() as rd:
        consumer = rd.spawn("consumer", "--port", str(broker.port), "--expect", str(n), log=logs / f"{tag}.consumer")
        agents = []
        for j in range(k):
            cfg = _member(work / f"{tag}-m{j}.toml", port=broker.port, outbox=work / f"{tag}-m{j}.db",
                          client_id=f"bench-{tag}-m{j}")
            agents.append(rd.spawn("agent", "--config", str(cfg), "--settle", "0.5", log=logs / f"{tag}-m{j}.agent"))
        consumer.expect("ready", 30)
        cpu0 = sum(a.expect("ready", 120)["cpu_s"] for a in agents)
        pub = rd.spawn("publisher", "--port", str(broker.port), "--n", str(n), log=logs / f"{tag}.publisher")
        sent = pub.expect("published", 300)
        got = consumer.expect("done", 300)
        for a in agents:
            a.stop()
        stats = [a.expect("stopped", 60) for a in agents]
    if got["count"] < n:
        raise RuntimeError(f"{tag}: consumer got {got['count']} of {n}")
    # CPU of all members together per note: steadier than the rate on a box shared with other work.
    cpu_us = (sum(s["cpu_s"] for s in stats) - cpu0) / n * 1e6
    return n / (got["t_last"] - sent["t_first"]), [{"processed": s["processed"], "cpu_us": cpu_us} for s in stats]


def run(quick: bool) -> list[dict]:
    n, rounds = (3000, 2) if quick else (10000, 3)
    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    shares: dict[str, list[list[int]]] = {s: [] for s in SIDES}
    cpu: dict[str, list[float]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        with bench_broker(work / "broker") as broker:
            for r, side in rounds_of(SIDES, rounds):
                rate, stats = _one(int(side), r, broker, work, n)
                rates[side].append(round(rate, 1))
                shares[side].append([s["processed"] for s in stats])
                cpu[side].append(round(stats[0]["cpu_us"], 1))
    peer = median(rates["1"])
    common = {
        "unit": "notes/s",
        "peer_name": "1 agent in the same share group (same config, same broker, same run)",
        "n": n,
        "stat": f"median of {rounds} alternating rounds (order rotated each round)",
        "measure": "N / (consumer's last result - publisher's first send); publisher QoS1 inflight "
                   f"{PUBLISHER_INFLIGHT}; each agent and load generator in its own process",
        "broker": "mosquitto 2.0.11, " + ", ".join(BROKER_SETTINGS),
        "agent": "1 route, built-in patterns task, source.share_group = bench, own client_id and outbox each",
        "samples_peer": rates["1"],
        "peer_cpu_us_per_note": median(cpu["1"]),
        "cores": os.cpu_count(),
        "load_avg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    return [
        {"name": f"scale_{k}_agents", "ours": median(rates[str(k)]), "peer": peer, **common,
         "samples_ours": rates[str(k)], "ours_cpu_us_per_note": median(cpu[str(k)]),
         "messages_per_member": shares[str(k)]}
        for k in (2, 3)
    ]
