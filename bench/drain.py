"""Draining a backlog after an outage: messages per second from the agent's outbox to the uplink, against a
plain paho publisher sending the same payloads.

The outbox is filled before the agent starts, with edge_agent.outbox.store.Outbox.put_many and rows exactly as
the agent writes them (patterns results of realistic notes, ~700 B each; common.make_results). Then the
agent starts with the uplink reachable: every row is backlog and goes out through the sink's replay lane
("replayed": true, token bucket). A consumer (QoS 1, edge/results/#) counts them.

- ours: edge_agent.agent.Agent in a child process, sink inflight 64 (default), replay_rate 1e9 so that
  the token bucket does not limit (replay_burst 100 > inflight, so it never binds either).
- peer: one paho client publishing the same rows (same topics, same bytes, read from an outbox file
  into memory first) QoS 1 with the same inflight window, 64.
- rate = (M - 1) / (consumer's last receipt - consumer's first receipt): drain throughput, without the
  start-up (reported apart: for the agent, outbox open with its quick_check, the pint registry, connect).
- a second row runs the agent with the default replay_rate (500/s), to show the throttle at work.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from bench.common import BROKER_SETTINGS, Round, agent_config, bench_broker, make_results, median, rounds_of
from edge_agent.config import OutboxConfig
from edge_agent.outbox.store import Outbox
from tests.kit import REPO
from tests.kit.broker import Broker

ROUNDS = 3
INFLIGHT = 64  # the sink's default; the peer uses the same window


def _fill(path: Path, rows: list[tuple[str, str, bytes]]) -> None:
    with Outbox(OutboxConfig.model_validate({"path": path})) as ob:
        for i in range(0, len(rows), 500):
            ob.put_many(rows[i : i + 500])


def _one(side: str, tag: str, broker: Broker, work: Path, rows: list, template: Path, replay_rate: str) -> dict:
    m = len(rows)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with Round() as rd:
        consumer = rd.spawn("consumer", "--port", str(broker.port), "--expect", str(m), log=logs / f"{tag}.consumer")
        consumer.expect("ready", 30)
        if side == "peer":
            pub = rd.spawn("rows", "--port", str(broker.port), "--db", str(template), "--inflight", str(INFLIGHT),
                           log=logs / f"{tag}.rows", profile=Path(f"{tag}.txt"))
            start = pub.expect("published", 600)
            t0, stats = start["t_connect"], {"cpu_us_per_msg": round(start["cpu_s"] / m * 1e6, 1)}
            got = consumer.expect("done", 600)
        else:
            outbox = work / f"{tag}.db"
            _fill(outbox, rows)
            cfg = agent_config(work / f"{tag}.toml", port=broker.port, outbox=outbox, level="warning",
                               sink={"replay_rate": float(replay_rate)})
            sut = rd.spawn("agent", "--config", str(cfg), "--log-level", "warning",
                           "--log-file", str(logs / f"{tag}.agentlog"), log=logs / f"{tag}.agent",
                           profile=Path(f"{tag}.txt"))
            t0 = sut.expect("started", 60)["t0"]
            ready = sut.expect("ready", 60)
            got = consumer.expect("done", 600)
            sut.stop()
            stats = sut.expect("stopped", 60)
            stats = {"cpu_us_per_msg": round((stats["cpu_s"] - ready["cpu_s"]) / m * 1e6, 1),
                     "replayed": stats["replayed"], "outbox_rows_at_stop": stats["outbox_rows"]}
    if got["count"] < m:
        raise RuntimeError(f"{tag}: consumer got {got['count']} of {m}")
    return {"rate": (m - 1) / (got["t_last"] - got["t_first"]), "first_result_after_start_s": got["t_first"] - t0,
            **stats}


def _ms(series: list[dict]) -> float:
    return round(statistics.median(x["first_result_after_start_s"] for x in series), 3)


def _series(sides: list[str], broker: Broker, work: Path, rows: list, template: Path, replay_rate: str,
            label: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in sides}
    for r, side in rounds_of(sides, ROUNDS):
        out[side].append(_one(side, f"{label}-{side}-r{r}", broker, work, rows, template, replay_rate))
    return out


def run(quick: bool) -> list[dict]:
    m = 10_000 if quick else 50_000
    m_throttled = 2_000 if quick else 5_000
    load0 = os.getloadavg()[0]
    rows = make_results(m)
    mean_bytes = round(sum(len(p) for _, _, p in rows) / m)
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        work = Path(tmp)
        same_disk = os.stat(work).st_dev == os.stat(REPO).st_dev
        template = work / "payloads.db"
        _fill(template, rows)
        template_small = work / "payloads-small.db"
        _fill(template_small, rows[:m_throttled])
        with bench_broker(work / "broker") as broker:
            fast = _series(["ours", "peer"], broker, work, rows, template, "1e9", "fast")
            slow = _series(["ours", "peer"], broker, work, rows[:m_throttled], template_small, "500.0", "default")

    def rates(series: list[dict]) -> list[float]:
        return [round(x["rate"], 1) for x in series]

    common = {
        "unit": "msg/s",
        "peer_name": f"plain paho publisher, QoS1, inflight {INFLIGHT}, same payloads from memory",
        "stat": f"median of {ROUNDS} alternating rounds (order rotated each round), same broker, same process run",
        "measure": "(M - 1) / (consumer's last result - its first result); consumer QoS1 on edge/results/#",
        "broker": "mosquitto 2.0.11, " + ", ".join(BROKER_SETTINGS),
        "payload_bytes_mean": mean_bytes,
        "agent": f"backlog put with Outbox.put_many before start (WAL synchronous=FULL"
                 f"{', on the repo disk' if same_disk else ', temp dir NOT on the repo disk'}); sink inflight "
                 f"{INFLIGHT}, replay_burst 100 (defaults); log level warning",
        "cores": os.cpu_count(),
        # Other work on the machine moves the rates a lot (the CPU per message much less): say how busy it was.
        "load_avg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    return [
        {"name": "drain", "ours": median(rates(fast["ours"])), "peer": median(rates(fast["peer"])), **common,
         "n": m, "replay_rate": "1e9 (token bucket effectively off)",
         "samples_ours": rates(fast["ours"]), "samples_peer": rates(fast["peer"]),
         "ours_cpu_us_per_msg": median([x["cpu_us_per_msg"] for x in fast["ours"]]),
         "peer_cpu_us_per_msg": median([x["cpu_us_per_msg"] for x in fast["peer"]]),
         "cpu_note": "CPU of the agent's process from both connections up to stop (all threads), of the "
                     "peer's from connect to its last PUBACK, per message",
         "ours_first_result_after_start_s": _ms(fast["ours"])},
        {"name": "drain_default_replay_rate", "ours": median(rates(slow["ours"])), "peer": median(rates(slow["peer"])),
         **common, "n": m_throttled, "replay_rate": "500/s (the default: the throttle is the point)",
         "samples_ours": rates(slow["ours"]), "samples_peer": rates(slow["peer"]),
         "ours_first_result_after_start_s": _ms(slow["ours"])},
    ]
