"""`edge-agent outbox stats|export|purge` on real outbox files, and beside the real running daemon."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from edge_agent.cli.main import main
from edge_agent.config import OutboxConfig
from edge_agent.outbox.store import Outbox, retained

from .kit import wait_for
from .kit.broker import free_port
from .kit.config import write_config

NOW = time.time()
HOUR = 3600.0


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config and its outbox: 3 old results (2 h), 2 new results, 1 new dead letter (not UTF-8)."""
    cfg = write_config(tmp_path / "c.toml", source_port=free_port(), sink_port=free_port(), outbox=tmp_path / "o.db")
    clock = [NOW - 2 * HOUR]
    with Outbox(OutboxConfig(path=tmp_path / "o.db"), clock=lambda: clock[0]) as ob:
        ob.put_many([(f"old{i}", "edge/results/plant/l1/notes", f'{{"n": {i}}}'.encode()) for i in range(3)])
        clock[0] = NOW
        ob.put_many([(f"new{i}", "edge/results/plant/l2/notes", f'{{"n": {i}, "t": "é"}}'.encode())
                     for i in range(2)])
        ob.put_many([("dl", "edge/deadletter", b"\xff\x00raw")])
    return cfg


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_stats_human_and_json(site: Path, capsys) -> None:
    rc, out, _ = run(capsys, "outbox", "stats", "--config", str(site), "--json")
    assert rc == 0
    s = json.loads(out)
    with Outbox(OutboxConfig(path=site.parent / "o.db")) as ob:
        truth = ob.stats()
    assert (s["rows"], s["bytes"]) == (6, truth.bytes)
    assert s["topics"] == {"edge/results/plant/l1/notes": 3, "edge/results/plant/l2/notes": 2, "edge/deadletter": 1}
    assert s["oldest_created_at"] == pytest.approx(NOW - 2 * HOUR)
    assert s["oldest_age_s"] >= 2 * HOUR - 1
    assert s["file_bytes"] > s["bytes"]
    assert s["daemon_pid"] is None

    rc, out, _ = run(capsys, "outbox", "stats", "--config", str(site))
    assert rc == 0
    assert "rows     6" in out and "not running" in out
    assert "edge/results/plant/l1/notes  3" in out


def test_export_jsonl_with_topic_filter_and_out_file(site: Path, capsys, tmp_path: Path) -> None:
    rc, out, err = run(capsys, "outbox", "export", "--config", str(site))
    assert rc == 0 and "exported 6 row(s)" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["old0", "old1", "old2", "new0", "new1", "dl"]  # oldest first
    assert rows[3]["payload"] == '{"n": 0, "t": "é"}' and rows[3]["topic"] == "edge/results/plant/l2/notes"
    assert base64.b64decode(rows[5]["payload_b64"]) == b"\xff\x00raw" and "payload" not in rows[5]
    assert rows[0]["created_at"] == pytest.approx(NOW - 2 * HOUR)

    dest = tmp_path / "export.jsonl"
    rc, out, _ = run(capsys, "outbox", "export", "--config", str(site), "--topic", "edge/results/+/l2/#",
                     "--out", str(dest))
    assert rc == 0 and out == ""
    assert [json.loads(line)["id"] for line in dest.read_text().splitlines()] == ["new0", "new1"]


def test_retained_rows_show_and_match_by_their_topic(tmp_path: Path, capsys) -> None:
    """Rows the sink publishes retained (UNS "latest") are read through the outbox's own row codec: stats,
    export and purge see `uns/...`, never the stored marker, and an MQTT filter matches them."""
    cfg = write_config(tmp_path / "c.toml", source_port=free_port(), sink_port=free_port(), outbox=tmp_path / "o.db")
    with Outbox(OutboxConfig(path=tmp_path / "o.db")) as ob:
        ob.put_many([("r", "edge/results/plant/l1/notes", b"{}"),
                     ("l1", retained("uns/site/l1/P-101/latest"), b"{}"),
                     ("l2", retained("uns/site/l1/P-101/latest"), b"{}"),
                     ("l3", retained("uns/site/l2/M-7/latest"), b"{}")])
        assert [(r.topic, r.retain) for r in ob.batch(10)] == [
            ("edge/results/plant/l1/notes", False), ("uns/site/l1/P-101/latest", True),
            ("uns/site/l1/P-101/latest", True), ("uns/site/l2/M-7/latest", True)]

    rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
    s = json.loads(out)
    assert rc == 0 and s["retained"] == 3
    assert s["topics"] == {"uns/site/l1/P-101/latest": 2, "edge/results/plant/l1/notes": 1, "uns/site/l2/M-7/latest": 1}

    rc, out, _ = run(capsys, "outbox", "export", "--config", str(cfg), "--topic", "uns/#")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [(r["id"], r["topic"], r["retain"]) for r in rows] == [
        ("l1", "uns/site/l1/P-101/latest", True), ("l2", "uns/site/l1/P-101/latest", True),
        ("l3", "uns/site/l2/M-7/latest", True)]

    rc, out, _ = run(capsys, "outbox", "purge", "--config", str(cfg), "--topic", "uns/+/l1/#", "--yes")
    assert rc == 0 and "deleted 2 row(s)" in out
    with Outbox(OutboxConfig(path=tmp_path / "o.db")) as ob:
        assert [r.id for r in ob.batch(10)] == ["r", "l3"]


def test_purge_needs_yes_and_honours_filters(site: Path, capsys) -> None:
    db = OutboxConfig(path=site.parent / "o.db")

    def ids() -> list[str]:
        with Outbox(db) as ob:
            return [r.id for r in ob.batch(100)]

    rc, _, err = run(capsys, "outbox", "purge", "--config", str(site))
    assert rc == 1 and "would delete 6 row(s)" in err and "--yes" in err
    assert len(ids()) == 6  # nothing went

    rc, out, _ = run(capsys, "outbox", "purge", "--config", str(site), "--older-than", str(HOUR), "--yes")
    assert rc == 0 and "deleted 3 row(s)" in out
    assert ids() == ["new0", "new1", "dl"]

    rc, out, _ = run(capsys, "outbox", "purge", "--config", str(site), "--topic", "edge/deadletter", "--yes")
    assert rc == 0 and "deleted 1 row(s)" in out
    assert ids() == ["new0", "new1"]
    with Outbox(db) as ob:  # reopening recounts: the file is consistent
        assert (ob.stats().count, ob.max_seq()) == (2, 6)  # seqs are never reused after a purge


def test_missing_outbox_and_bad_config(tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.toml", source_port=1883, sink_port=1883, outbox=tmp_path / "none.db")
    rc, _, err = run(capsys, "outbox", "stats", "--config", str(cfg))
    assert rc == 1 and "no outbox at" in err
    assert not (tmp_path / "none.db").exists()  # a read-only command creates nothing
    bad = tmp_path / "bad.toml"
    bad.write_text("[outbox]\npath = 3\n")
    rc, _, err = run(capsys, "outbox", "export", "--config", str(bad))
    assert rc == 2 and "invalid config" in err


def test_beside_the_running_daemon(tmp_path: Path, broker, spawn_agent, publisher, capsys) -> None:
    """With the uplink down the results wait in the outbox: stats and export read them while the daemon
    runs; purge refuses ("stop the daemon first") until it is stopped, then deletes them."""
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=free_port(), outbox=tmp_path / "o.db")
    agent = spawn_agent(cfg, tmp_path / "agent.log")
    assert wait_for(lambda: "gw-test-source" in broker.log() and "plant/+/notes" in broker.log(), timeout=60)
    pub = publisher(broker.port)
    for i in range(5):
        pub.note("plant/l1/notes", i)

    def rows() -> int:
        rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
        return json.loads(out)["rows"] if rc == 0 else -1

    assert wait_for(lambda: rows() == 5, timeout=60), (tmp_path / "agent.log").read_text()
    rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
    assert json.loads(out)["daemon_pid"] == str(agent.proc.pid)
    rc, out, _ = run(capsys, "outbox", "export", "--config", str(cfg))
    assert rc == 0 and len(out.splitlines()) == 5
    rc, _, err = run(capsys, "outbox", "purge", "--config", str(cfg), "--yes")
    assert rc == 1 and "stop the daemon first" in err and f"pid {agent.proc.pid}" in err
    assert rows() == 5

    assert agent.kill(15) == 0
    rc, out, _ = run(capsys, "outbox", "purge", "--config", str(cfg), "--yes")
    assert rc == 0 and "deleted 5 row(s)" in out
    assert rows() == 0
