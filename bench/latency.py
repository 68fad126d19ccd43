"""latency: publish → result received, p50/p99/max, at fixed offered rates, against a plain paho relay; and
the latency of live results while a backlog drains, against the same live stream with no backlog.

    python bench/run.py latency [--quick] --json OUT

Two bench Mosquittos (common.BROKER_SETTINGS): the source, where notes are published, and the uplink, where
results are consumed. Each party runs in its own process; times are time.monotonic() (one clock for every
process on the machine).

- Open loop, no coordinated omission: the publisher ("pace") sends note k at its scheduled time
  t0 + k / rate, QoS 1, whatever happened to the earlier ones (paho's publish() only queues), and the note's
  id carries that scheduled time and the actual send time (`<phase>/<k>@<scheduled>@<sent>`). The consumer
  (QoS 1 on edge/results/#) reads the id back (the result's `input_id`; the relay forwards the note itself)
  and records receipt - scheduled: a publisher that falls behind (a loaded box, a slow PUBACK) adds its lag
  to the latency instead of hiding it. Latency from the actual send is reported beside it
  (`from_actual_send`), and the publisher's lag behind its schedule (`publisher_lag_p99_ms`).
- Rates 10, 100 and 1,000 notes/s, in that order, after a warm-up (50 notes at 100/s, not counted), on one
  running system under test per side and round; `--quick` shortens each rate's run, never drops one.
- Sides: the agent (common.agent_config: one route, source session_expiry 0 and receive_maximum as the
  relay's, every other pipeline/sink setting the shipped default; log level warning) with (a) the patterns
  route and (b) a classifier route (zero-shot int8 MiniLM, models/minilm-l6, the labels of configs/local.toml's
  `category` task), each with the shipped batching window (`pipeline.batch_wait_ms`, 5 ms; 20 ms before
  this bench) and with the values in KNOBS; the peer: common's paho→paho relay (subscribe on the source,
  publish on the uplink, no disk, no extraction).
- Figures: nearest-rank percentiles of every note of every round pooled (rounds alternate, order rotated:
  common.rounds_of). Rows give ours p99 / relay p99 as `ratio` (LOWER is better here), plus the absolute ms.
  `kept_up` false (delivered < 95 % of the offered rate) means that side could not sustain the rate: its
  latency is then a growing queue, and longer runs give larger figures.

Live latency during a drain (`latency/live_during_drain`, a row here rather than in drain.py: it is this
bench's open-loop stream and consumer, and drain.py measures throughput against a publisher peer). The
agent's sink reaches the uplink through tests/kit's FaultProxy (in this, the parent process). Backlog run:
the outbox holds M results at start (rows exactly as the agent writes them, common.make_results, put with
Outbox.put_many; M = 50,000, `--quick` 30,000) and the proxy refuses (uplink unreachable); live notes at
50/s start at the agent's READY and, after OUTAGE_S, the proxy heals: the sink connects, everything
committed before it (M rows plus the outage's live notes) is backlog, replayed with replay_rate unlimited
(1e9, as drain.py) while live notes keep coming. Live notes scheduled between the first and the last
replayed result received are "during the drain" (the consumer tells replayed results by their
`"replayed":true`, without parsing them, so that its own cost does not pace the drain). Baseline run: empty
outbox, proxy open, the same live stream. Same run, alternating. Target (issue 14): p99 ratio ≤ 2.

    python -m bench.latency pace --port P --rate R --seconds S --phase NAME
    python -m bench.latency consumer --port U --phase NAME [--replayed M]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.common import (
    BROKER_SETTINGS,
    OUT_FILTER,
    OUT_PREFIX,
    PUBLISHER_INFLIGHT,
    Child,
    Round,
    _emit,
    agent_config,
    bench_broker,
    make_notes,
    make_results,
    rounds_of,
)
from tests.kit import REPO

MODELS = ("minilm-l6",)  # built by bench/run.py when missing
MODEL = REPO / "models" / "minilm-l6"
RATES = (10, 100, 1000)
SECONDS = {10: 30.0, 100: 20.0, 1000: 10.0}
QUICK_SECONDS = {10: 10.0, 100: 5.0, 1000: 3.0}
WARMUP = (100, 0.5)  # rate, seconds
# The knob the pipeline's latency turns on: the batching window, pipeline.batch_wait_ms (shipped: 5 ms). Each
# route also runs with these values ("+waitN" sides): none, and the 20 ms shipped before.
KNOBS = {"patterns": ("+wait0", "+wait20"), "classifier": ("+wait0", "+wait20")}
ROUNDS, QUICK_ROUNDS = 3, 1
LIVE_RATE = 50
DRAIN_ROWS, QUICK_DRAIN_ROWS = 50_000, 30_000
QUICK_DRAIN_ROUNDS = 2  # a drain gives ~50 live notes a second: one quick round is too few for a p99
BASELINE_SECONDS, QUICK_BASELINE_SECONDS = 20.0, 10.0
OUTAGE_S = 1.0  # live notes published while the uplink is unreachable, before it comes back
LIVE_TOPIC = "plant/live/notes"  # the drain rows' results are on plant/line1-4/notes
IDLE_S = 15.0  # the consumer gives up this long after its last message


def _shipped_wait() -> int:
    from edge_agent.config import PipelineConfig

    return int(PipelineConfig.model_fields["batch_wait_ms"].default)


def _labels() -> dict[str, str]:
    """The zero-shot labels of the quickstart's `category` classifier (configs/local.toml), not a copy."""
    cfg = tomllib.loads((REPO / "configs" / "local.toml").read_text())
    return dict(cfg["tasks"]["category"]["labels"])


# -- the children ---------------------------------------------------------------------------------------


def _nearest_rank(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def child_pace(a: argparse.Namespace) -> None:
    """Open-loop QoS 1 publisher: note k at t0 + k/rate for `seconds` (or until "stop" on stdin)."""
    from bench.common import _client, _connect

    n_max = int(a.rate * a.seconds)
    notes = make_notes(n_max, a.seed)
    acked = [0]
    c = _client("pace", inflight=PUBLISHER_INFLIGHT)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.on_publish = lambda *_: acked.__setitem__(0, acked[0] + 1)
    _connect(c, a.port)
    connected.wait(10)
    stop = threading.Event()

    def read_stop() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.set()
                return

    threading.Thread(target=read_stop, daemon=True).start()
    lags: list[float] = []
    t0 = time.monotonic() + 0.05
    sent = 0
    for k in range(n_max):
        if stop.is_set():
            break
        t = t0 + k / a.rate
        wait = t - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        lags.append(now - t)
        topic, payload = notes[k]
        topic = a.topic or topic
        text = json.loads(payload)["text"]
        # The id carries the scheduled time (what latency is measured from) and the actual send time.
        c.publish(topic, json.dumps({"id": f"{a.phase}/{k}@{t:.6f}@{now:.6f}", "text": text}).encode(), qos=1)
        sent += 1
    deadline = time.monotonic() + 60
    while acked[0] < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()
    _emit("published", n=sent, acked=acked[0], t0=t0, t_end=t0 + sent / a.rate,
          lag_p99_ms=round((_nearest_rank(lags, 0.99) or 0) * 1e3, 2), lag_max_ms=round(max(lags, default=0) * 1e3, 2))


def child_consumer(a: argparse.Namespace) -> None:
    """QoS 1 on the results: per live note of `phase`, (scheduled send, latency from it, latency from the actual
    send); replayed results counted.
    Ends once "expect N" came on stdin and N live notes arrived (or IDLE_S after the last message)."""
    from bench.common import _client, _connect

    prefix = a.phase + "/"
    lat: list[tuple[float, float, float]] = []
    rep: dict[str, Any] = {"n": 0, "t_first": None, "t_last": None}
    expect: list[int | None] = [None]
    last_rx = [time.monotonic()]
    drained = threading.Event()
    finished = threading.Event()

    def check() -> None:
        if expect[0] is not None and len(lat) >= expect[0]:
            finished.set()

    def on_message(_c, _u, msg) -> None:
        now = time.monotonic()
        if msg.retain:
            return
        last_rx[0] = now
        # A replayed result is told by bytes (results.mark_replayed's marker), not parsed: at drain speed the
        # consumer's own cost would otherwise decide how fast the backlog leaves the uplink broker.
        if b',"replayed":true' in msg.payload:
            rep["n"] += 1
            rep["t_first"] = rep["t_first"] or now
            rep["t_last"] = now
            if a.replayed and rep["n"] >= a.replayed and not drained.is_set():
                drained.set()
                _emit("drained", **rep)
            return
        d = json.loads(msg.payload)
        rid = d.get("input_id", d.get("id"))
        if isinstance(rid, str) and rid.startswith(prefix):
            _, scheduled, sent = rid.split("@")
            lat.append((float(scheduled), now - float(scheduled), now - float(sent)))
            check()

    def read_stdin() -> None:
        for line in sys.stdin:
            word, _, arg = line.strip().partition(" ")
            if word == "expect":
                expect[0] = int(arg)
                last_rx[0] = max(last_rx[0], time.monotonic())
                check()
            elif word == "stop":
                finished.set()

    c = _client("latency-consumer")
    c.on_connect = lambda cl, *_: cl.subscribe(a.topic, qos=1)
    c.on_subscribe = lambda *_: _emit("ready")
    c.on_message = on_message
    _connect(c, a.port)
    threading.Thread(target=read_stdin, daemon=True).start()
    while not finished.wait(0.2):
        if expect[0] is not None and time.monotonic() - last_rx[0] > IDLE_S:
            break
    c.disconnect()
    c.loop_stop()
    _emit("done", n=len(lat), lat=[[round(x, 6) for x in row] for row in lat], replayed=rep)


# -- the parent -----------------------------------------------------------------------------------------


def _tell(child: Child, line: str) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(line + "\n")
    child.proc.stdin.flush()


def _split(rows: list[list[float]], rate: float | None = None) -> dict[str, Any]:
    """The consumer's (scheduled, latency, latency from the actual send) rows as lists; with the offered
    rate, the rate delivered (notes / (last receipt - first scheduled send))."""
    out: dict[str, Any] = {"lat": [x for _, x, _ in rows], "lat_sent": [y for _, _, y in rows]}
    if rate and len(rows) > 1:
        span = max(t + x for t, x, _ in rows) - min(t for t, _, _ in rows)
        out["delivered_per_s"] = len(rows) / span if span > 0 else None
    return out


def _stats(lat_s: list[float]) -> dict[str, Any]:
    ms = [x * 1e3 for x in lat_s]

    def r(q: float) -> float | None:
        v = _nearest_rank(ms, q)
        return None if v is None else round(v, 2)

    return {"n": len(ms), "p50_ms": r(0.5), "p90_ms": r(0.9), "p99_ms": r(0.99),
            "max_ms": round(max(ms), 2) if ms else None}


def _phase(rd: Round, brokers: tuple[int, int], work: Path, phase: str, rate: float, seconds: float) -> dict:
    """One open-loop stream: the consumer up, then the publisher at `rate` for `seconds`, until every note
    it sent came back (or the consumer's idle timeout)."""
    src, up = brokers
    logs = work / "logs"
    cons = rd.spawn("consumer", "--port", str(up), "--phase", phase, log=logs / f"{phase}.consumer",
                    module="bench.latency")
    cons.expect("ready", 30)
    pub = rd.spawn("pace", "--port", str(src), "--rate", str(rate), "--seconds", str(seconds), "--phase", phase,
                   log=logs / f"{phase}.pace", module="bench.latency")
    sent, got = _finish(cons, pub, seconds + 120)
    return {"sent": sent, "received": got["n"], **_split(got["lat"], rate)}


def _finish(cons: Child, pub: Child, timeout: float) -> tuple[dict, dict]:
    sent = pub.expect("published", timeout)
    _tell(cons, f"expect {sent['n']}")
    got = cons.expect("done", IDLE_S + 120)
    return sent, got


def _sut(rd: Round, side: str, brokers: tuple[int, int], work: Path, tag: str) -> Child:
    src, up = brokers
    logs = work / "logs"
    if side == "relay":
        sut = rd.spawn("relay", "--port", str(src), "--uplink-port", str(up), log=logs / f"{tag}.relay")
    else:
        route, _, knob = side.partition("+")
        tasks, tables = ("patterns",), None
        if route == "classifier":
            tasks = ("category",)
            tables = {"category": {"kind": "classifier", "model": MODEL, "labels": _labels()}}
        cfg = agent_config(work / f"{tag}.toml", port=src, outbox=work / f"{tag}.db", level="warning",
                           sink={"port": up}, tasks=tasks, task_tables=tables,
                           pipeline={"batch_wait_ms": int(knob.removeprefix("wait"))} if knob else None)
        sut = rd.spawn("agent", "--config", str(cfg), "--log-level", "warning", "--log-file",
                       str(logs / f"{tag}.agentlog"), "--settle", "0.5", log=logs / f"{tag}.agent")
    sut.expect("ready", 120)
    return sut


def _rates_round(side: str, r: int, brokers: tuple[int, int], work: Path, seconds: dict[int, float]) -> dict:
    tag = f"{side}-r{r}"
    out: dict[int, dict] = {}
    with Round() as rd:
        sut = _sut(rd, side, brokers, work, tag)
        _phase(rd, brokers, work, f"{tag}-warm", *WARMUP)  # first-note costs (imports, first model call)
        for rate in RATES:
            out[rate] = _phase(rd, brokers, work, f"{tag}-{rate}", rate, seconds[rate])
        sut.stop()
        sut.expect("stopped", 60)
    return out


def _drain_round(kind: str, r: int, brokers: tuple[int, int], work: Path, rows: list, seconds: float) -> dict:
    """One agent with the sink behind a FaultProxy. "backlog": the outbox holds `rows` at start and the proxy
    refuses (uplink unreachable); live notes flow for OUTAGE_S (they join the backlog), then the proxy heals
    and the live stream goes on until the whole backlog was received, plus 1 s. "baseline": empty outbox,
    proxy open, the same live stream for `seconds`. Two consumers: one of the live results' topic alone
    (the figure), one of every result (counts the replayed ones; sees live results behind its own queue)."""
    from bench.drain import _fill
    from tests.kit.proxy import FaultProxy

    tag = f"drain-{kind}-r{r}"
    src, up = brokers
    logs = work / "logs"
    outbox = work / f"{tag}.db"
    m = len(rows) if kind == "backlog" else 0
    if m:
        _fill(outbox, rows)
    with FaultProxy(up) as proxy, Round() as rd:
        if m:
            proxy.refuse()
        cfg = agent_config(work / f"{tag}.toml", port=src, outbox=outbox, level="warning",
                           sink={"port": proxy.port, "replay_rate": 1e9})
        live = rd.spawn("consumer", "--port", str(up), "--phase", tag, "--topic", OUT_PREFIX + LIVE_TOPIC,
                        log=logs / f"{tag}.live", module="bench.latency")
        every = rd.spawn("consumer", "--port", str(up), "--phase", tag, "--replayed", str(m),
                         log=logs / f"{tag}.every", module="bench.latency")
        live.expect("ready", 30)
        every.expect("ready", 30)
        agent = rd.spawn("agent", "--config", str(cfg), "--log-level", "warning", "--log-file",
                         str(logs / f"{tag}.agentlog"), "--settle", "0.5", "--without-sink",
                         "--watch-replayed", str(m), log=logs / f"{tag}.agent")
        agent.expect("ready", 60)
        pub = rd.spawn("pace", "--port", str(src), "--rate", str(LIVE_RATE), "--seconds",
                       str(600 if m else seconds), "--phase", tag, "--topic", LIVE_TOPIC,
                       log=logs / f"{tag}.pace", module="bench.latency")
        if m:
            time.sleep(OUTAGE_S)
            t_heal = time.monotonic()
            proxy.heal()
            t_first = agent.expect("replaying", 60)["t"]
            t_last = agent.expect("replayed", 600)["t"]
            every.expect("drained", 600)
            time.sleep(1.0)
            _tell(pub, "stop")
        sent = pub.expect("published", 660)
        for c in (live, every):
            _tell(c, f"expect {sent['n']}")
        got, got_every = live.expect("done", IDLE_S + 120), every.expect("done", IDLE_S + 120)
        agent.stop()
        stopped = agent.expect("stopped", 60)
    out = {"sent": sent["n"], "received": got["n"], "lag_p99_ms": sent["lag_p99_ms"],
           "replayed": got_every["replayed"]["n"], "outbox_rows_at_stop": stopped["outbox_rows"]}
    if not m:
        return {**out, **_split(got["lat"]), "every": _split(got_every["lat"])}
    # During the drain: live notes scheduled while the sink's backlog lane ran (its first to its M-th replay).
    rep = got_every["replayed"]
    return {**out, **_split([x for x in got["lat"] if t_first <= x[0] <= t_last]),
            "every": _split([x for x in got_every["lat"] if t_first <= x[0] <= t_last]),
            "after_lat": [x for t, x, _ in got["lat"] if t > t_last],
            "drain_s": t_last - t_first, "drain_received_s": rep["t_last"] - rep["t_first"],
            "first_replayed_after_heal_s": t_first - t_heal}


def run(quick: bool) -> list[dict]:
    load0 = os.getloadavg()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    seconds = QUICK_SECONDS if quick else SECONDS
    sides = ["relay", *(f"{route}{knob}" for route in ("patterns", "classifier") for knob in ("", *KNOBS[route]))]
    res: dict[str, dict[int, list[dict]]] = {s: {x: [] for x in RATES} for s in sides}
    m = QUICK_DRAIN_ROWS if quick else DRAIN_ROWS
    base_s = QUICK_BASELINE_SECONDS if quick else BASELINE_SECONDS
    drain: dict[str, list[dict]] = {"baseline": [], "backlog": []}
    rows = make_results(m)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        with bench_broker(work / "source") as source, bench_broker(work / "uplink") as uplink:
            brokers = (source.port, uplink.port)
            for r, side in rounds_of(sides, rounds):
                for rate, got in _rates_round(side, r, brokers, work, seconds).items():
                    res[side][rate].append(got)
            for r, kind in rounds_of(["baseline", "backlog"], QUICK_DRAIN_ROUNDS if quick else rounds):
                drain[kind].append(_drain_round(kind, r, brokers, work, rows, base_s))
    load1 = os.getloadavg()

    def pooled(side: str, rate: int) -> dict[str, Any]:
        rs = res[side][rate]
        st = _stats([x for g in rs for x in g["lat"]])
        st["sent"] = sum(g["sent"]["n"] for g in rs)
        st["received"] = sum(g["received"] for g in rs)
        st["p99_ms_per_round"] = [_stats(g["lat"])["p99_ms"] for g in rs]
        st["from_actual_send"] = _stats([x for g in rs for x in g["lat_sent"]])
        st["delivered_per_s_per_round"] = [round(g.get("delivered_per_s") or 0, 1) for g in rs]
        # Kept up: delivered within 5 % of the offered rate in every round (else the latency is a queue's growth).
        st["kept_up"] = all((g.get("delivered_per_s") or 0) >= 0.95 * rate for g in rs)
        st["publisher_lag_p99_ms"] = max(g["sent"]["lag_p99_ms"] for g in rs)
        return st

    common = {
        "unit": "ms (p99, publish -> result received)",
        "ratio_note": "ratio = ours p99 / peer p99: LOWER is better here",
        "peer_name": "paho→paho relay (sub QoS1 on the source broker → on_message → pub QoS1 on the uplink broker)",
        "measure": "open loop: note k scheduled at t0 + k/rate, latency = consumer receipt - scheduled send "
                   "(CLOCK_MONOTONIC); nearest-rank percentiles over every note of every round",
        "rounds": rounds, "seconds_per_rate": seconds,
        "broker": "2 x mosquitto 2.0.11 (source, uplink), " + ", ".join(BROKER_SETTINGS),
        "agent": "common.agent_config: source session_expiry 0, receive_maximum 65535 (as the relay's); pipeline "
                 "and sink defaults (batch_max 256, sink inflight 64) unless the row names a knob; log level "
                 "warning; outbox WAL synchronous=FULL in a temp dir",
        "load_avg_start_end": [[round(x, 2) for x in load0], [round(x, 2) for x in load1]],
    }
    out: list[dict] = []
    routes = {"patterns": "built-in patterns task",
              "classifier": "zero-shot classifier, int8 MiniLM (models/minilm-l6), configs/local.toml category labels"}
    for side in sides[1:]:
        route, _, knob = side.partition("+")
        for rate in RATES:
            ours, peer = pooled(side, rate), pooled("relay", rate)
            ratio = round(ours["p99_ms"] / peer["p99_ms"], 2) if ours["p99_ms"] and peer["p99_ms"] else None
            p50 = round(ours["p50_ms"] / peer["p50_ms"], 2) if ours["p50_ms"] and peer["p50_ms"] else None
            wait = knob.removeprefix("wait")
            out.append({"name": f"latency/{route}{f'/batch_wait_ms={wait}' if knob else ''}/{rate}_per_s",
                        "ours": ours["p99_ms"], "peer": peer["p99_ms"], "ratio": ratio, "p50_ratio": p50,
                        "rate_per_s": rate, "route": routes[route],
                        "knob": f"pipeline.batch_wait_ms = {wait} (shipped: {_shipped_wait()})" if knob
                        else "shipped defaults",
                        "ours_stats": ours, "peer_stats": peer, **common})
    def pool(kind: str, key: str, every: bool = False) -> dict[str, Any]:
        return _stats([x for g in drain[kind] for x in (g["every"] if every else g)[key]])

    base, during = pool("baseline", "lat"), pool("backlog", "lat")
    base["from_actual_send"], during["from_actual_send"] = pool("baseline", "lat_sent"), pool("backlog", "lat_sent")
    every_base, every_during = pool("baseline", "lat", every=True), pool("backlog", "lat", every=True)
    drain_s = [round(g["drain_s"], 2) for g in drain["backlog"]]
    out.append({
        "name": "latency/live_during_drain", "ours": during["p99_ms"], "peer": base["p99_ms"],
        "ratio": round(during["p99_ms"] / base["p99_ms"], 2) if during["p99_ms"] and base["p99_ms"] else None,
        "p50_ratio": round(during["p50_ms"] / base["p50_ms"], 2) if during["p50_ms"] and base["p50_ms"] else None,
        "unit": "ms (p99 of live results, publish -> received)", "target": "ratio <= 2 (issue 14)",
        "peer_name": "the same live stream through an agent with an empty outbox (no backlog), same run",
        "live_rate_per_s": LIVE_RATE, "backlog_rows": m, "replay_rate": "1e9 (unlimited)", "route": "patterns",
        "during_drain": during, "no_backlog": base,
        "after_drain": _stats([x for g in drain["backlog"] for x in g["after_lat"]]),
        "consumer_of_everything": {
            "note": "the same live results at a second consumer subscribed to every result (edge/results/#): it "
                    "receives the backlog too, and live results wait behind whatever it has not read yet",
            "during_drain": every_during, "no_backlog": every_base,
            "ratio": round(every_during["p99_ms"] / every_base["p99_ms"], 2)
            if every_during["p99_ms"] and every_base["p99_ms"] else None},
        "drain_s_per_round": drain_s,
        "drain_rate_per_s": [round(m / g["drain_s"]) for g in drain["backlog"] if g["drain_s"] > 0],
        "drain_received_s_per_round": [round(g["drain_received_s"], 2) for g in drain["backlog"]],
        "replayed_per_round": [g["replayed"] for g in drain["backlog"]],
        "first_replayed_after_heal_s": [round(g["first_replayed_after_heal_s"], 2) for g in drain["backlog"]],
        "measure": f"backlog of {m} rows put in the outbox before start (Outbox.put_many, common.make_results), "
                   f"the uplink unreachable (the sink's FaultProxy refuses) for the first {OUTAGE_S} s of the live "
                   f"stream (on {LIVE_TOPIC}), then restored; 'during the drain' = live notes scheduled between "
                   f"the sink's first replayed row and its {m}th (drain_s); their results read by a consumer of "
                   "their topic alone; the sink reaches the uplink through tests/kit's FaultProxy in both runs "
                   "(its pumps run in the bench's parent process)",
        "rounds": QUICK_DRAIN_ROUNDS if quick else rounds, "broker": common["broker"],
        "load_avg_start_end": common["load_avg_start_end"],
    })
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("pace")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--phase", required=True)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--topic", help="publish every note here (default: make_notes' four line topics)")
    p.set_defaults(func=child_pace)
    p = sub.add_parser("consumer")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--phase", required=True)
    p.add_argument("--replayed", type=int, default=0, help="emit 'drained' once this many replayed results came")
    p.add_argument("--topic", default=OUT_FILTER)
    p.set_defaults(func=child_consumer)
    a = ap.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
