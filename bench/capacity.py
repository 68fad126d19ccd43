"""Bytes per result, for outbox sizing (README "Capacity planning"). Not a speed bench: no peer.

    python -m bench.capacity [--n 400] [--json OUT]

Runs the real Agent against a Mosquitto on a free port with the uplink unreachable (sink port closed),
so every result stays in the outbox, then reads what would be published: the payload bytes of each row
(what goes on the wire; a replay adds one byte, `true` for `false`), the bytes `outbox.max_bytes` counts
(payload + topic), and the SQLite file growth per row after a checkpoint (ids, index, page slack; the
size of an empty outbox subtracted).
Inputs are real rows from ../shared/data (read-only, never copied): MaintIE work-order texts as notes,
BGL/HDFS log lines as logs. Cases:
- patterns: the built-in extractor only;
- patterns+classifiers: configs/local.toml's notes route (patterns, category, urgency; zero-shot MiniLM);
- log_template: configs/local.toml's logs route (patterns, logs);
- deadletter: the same notes with the text under the wrong key (`{"id", "note"}`), dead-lettered.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from bench.common import bench_broker
from edge_agent import config, logs
from edge_agent.mqtt.client import make_client
from edge_agent.outbox.store import Outbox
from tests.kit import REPO, wait_for
from tests.kit.agent import Running
from tests.kit.broker import Broker, free_port

DATA = Path(os.environ.get("EDGE_AGENT_DATA") or REPO.parent / "shared" / "data")


def _rows(name: str, n: int) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


def _cases(n: int) -> dict[str, tuple[list[str], str, list[bytes]]]:
    """case -> (route tasks, inbound topic, payloads)."""
    notes = [json.dumps({"id": r["id"], "text": r["text"]}).encode() for r in _rows("maintie_gold.jsonl", n)]
    half = n // 2
    lines = [json.dumps({"message": r["text"]}).encode() for r in _rows("bgl_2k.jsonl", half)]
    lines += [json.dumps({"message": r["text"]}).encode() for r in _rows("hdfs_2k.jsonl", n - half)]
    wrong = [json.dumps({"id": r["id"], "note": r["text"]}).encode() for r in _rows("maintie_gold.jsonl", n)]
    return {
        "patterns": (["patterns"], "plant/line1/notes", notes),
        "patterns+classifiers": (["patterns", "category", "urgency"], "plant/line1/notes", notes),
        "log_template": (["patterns", "logs"], "plant/line1/logs", lines),
        "deadletter": (["patterns"], "plant/line1/notes", wrong),
    }


def _config(tmp: Path, port: int, tasks: list[str], topic: str) -> config.Config:
    data = tomllib.loads((REPO / "configs" / "local.toml").read_text())
    for t in data["tasks"].values():
        if "model" in t:
            t["model"] = str(REPO / t["model"])
    data["source"]["port"] = port
    data["sink"]["port"] = free_port()  # nothing listens: every result stays in the outbox
    data["outbox"]["path"] = str(tmp / "outbox.db")
    data["routes"] = [r for r in data["routes"] if r["topic"].split("/")[-1] == topic.split("/")[-1]]
    data["routes"][0]["tasks"] = tasks
    data["pipeline"] = {"drain_timeout_s": 1.0}
    return config.parse(data, environ={})


def _measure(case: str, tasks: list[str], topic: str, payloads: list[bytes], broker: Broker, tmp: Path) -> dict:
    cfg = _config(tmp, broker.port, tasks, topic)
    running = Running(cfg, wait=False)
    agent = running.agent
    pub = make_client(cfg.source, f"capacity-pub-{case}", persistent=False)
    try:
        assert wait_for(lambda: agent.source is not None and agent.source.connected.is_set(), 60)
        time.sleep(0.5)  # the SUBSCRIBE goes out right after CONNACK
        pub.connect(cfg.source.host, cfg.source.port)
        pub.loop_start()
        for p in payloads:
            pub.publish(topic, p, qos=1).wait_for_publish(10)
        ok = wait_for(lambda: agent.pipeline is not None and agent.pipeline.processed >= len(payloads), 600)
        assert ok, f"{case}: processed {agent.pipeline.processed if agent.pipeline else 0} of {len(payloads)}"
    finally:
        pub.disconnect()
        pub.loop_stop()
        running.stop(timeout=60)
    db = cfg.outbox.path
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = conn.execute("SELECT length(payload), size FROM outbox").fetchall()
    with Outbox(cfg.outbox.model_copy(update={"path": tmp / "empty.db"})):
        pass  # the size of an empty outbox (schema, first pages) is not per-row overhead
    files = sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) - (tmp / "empty.db").stat().st_size
    wire = [r[0] for r in rows]
    return {
        "case": case,
        "inputs": len(payloads),
        "rows": len(rows),
        "input_bytes_mean": round(statistics.mean(len(p) for p in payloads), 1),
        "payload_bytes_mean": round(statistics.mean(wire), 1),
        "payload_bytes_p95": sorted(wire)[int(0.95 * (len(wire) - 1))],
        "counted_bytes_mean": round(statistics.mean(r[1] for r in rows), 1),
        "file_bytes_per_row": round(files / len(rows), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="inputs per case")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logs.configure("warning", "json", stream=sys.stderr)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp_s:
        broker = bench_broker(Path(tmp_s) / "broker").start()
        try:
            for case, (tasks, topic, payloads) in _cases(args.n).items():
                work = Path(tmp_s) / case.replace("+", "_")
                work.mkdir()
                out.append(_measure(case, tasks, topic, payloads, broker, work))
                print(json.dumps(out[-1]), flush=True)
        finally:
            broker.stop()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
