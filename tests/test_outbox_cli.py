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
from .kit.config import agent_config, merge, write_config, write_toml

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


def test_one_daemon_per_outbox_file_whatever_its_name(tmp_path: Path, broker, spawn_agent, publisher, capsys) -> None:
    """The lock goes by the outbox's real path: a second daemon reaching the same file through a symlink (to the
    file or to its directory) or a relative path cannot start, and purge through such a name refuses."""
    import os
    import subprocess
    import sys

    from .kit import REPO

    real = tmp_path / "state" / "o.db"
    cfg = write_config(tmp_path / "a.toml", source_port=broker.port, sink_port=free_port(), outbox=real)
    agent = spawn_agent(cfg, tmp_path / "agent.log")
    assert wait_for(lambda: "gw-test-source" in broker.log() and "plant/+/notes" in broker.log(), timeout=60)
    pub = publisher(broker.port)
    for i in range(5):
        pub.note("plant/l1/notes", i)
    assert wait_for(lambda: run(capsys, "outbox", "stats", "--config", str(cfg), "--json")[1].count('"rows": 5'),
                    timeout=60), (tmp_path / "agent.log").read_text()

    (tmp_path / "link.db").symlink_to(real)
    (tmp_path / "statelink").symlink_to(tmp_path / "state")
    names = [tmp_path / "link.db", tmp_path / "statelink" / "o.db", Path(os.path.relpath(real, REPO))]
    for name in names:
        other = write_config(tmp_path / "b.toml", source_port=broker.port, sink_port=free_port(), outbox=name,
                             gateway_id="gw-other")
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(other)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "in use by a running edge-agent" in r.stderr, (name, r.stderr[-2000:])
        assert f"pid {agent.proc.pid}" in r.stderr
        rc, _, err = run(capsys, "outbox", "purge", "--config", str(other), "--yes")
        assert rc == 1 and "stop the daemon first" in err, (name, err)
        rc, out, _ = run(capsys, "outbox", "stats", "--config", str(other), "--json")
        assert json.loads(out)["daemon_pid"] == str(agent.proc.pid), name
    rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
    assert json.loads(out)["rows"] == 5  # nothing deleted under the running daemon
    assert agent.kill(15) == 0


def test_hard_linked_outbox_refused(tmp_path: Path, capsys) -> None:
    import os

    from edge_agent.errors import ConfigError
    from edge_agent.outbox.lock import OutboxLock

    db = tmp_path / "o.db"
    with Outbox(OutboxConfig(path=db)):
        pass
    os.link(db, tmp_path / "twin.db")
    with pytest.raises(ConfigError) as ei:
        OutboxLock(tmp_path / "twin.db").acquire()
    assert ei.value.field == "outbox.path" and "2 hard links" in ei.value.message


def test_outbox_deleted_under_the_daemon_is_recreated(tmp_path: Path, broker, spawn_agent, publisher,
                                                      capsys) -> None:
    """rm -rf of the outbox's directory while the daemon runs (uplink down, 5 results waiting): within
    seconds the daemon logs outbox.file_lost, counts it (edge_agent_outbox_files_lost_total), and the file,
    its 5 rows and the lock are back, so `outbox stats` sees them and purge still refuses. Later notes land
    there too, and all 10 results reach the uplink when it comes up."""
    import shutil
    import urllib.request

    from .kit.agent import log_events
    from .kit.broker import Broker
    from .kit.clients import Collector

    state = tmp_path / "state"
    sink_port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=sink_port, outbox=state / "o.db",
                       metrics={"enabled": True, "port": metrics_port})
    log = tmp_path / "agent.log"
    uplink = Broker(tmp_path / "uplink", port=sink_port).start()  # once, for the consumer's persistent session
    consumer = Collector(uplink.port, "edge/results/#", client_id="consumer")
    assert consumer.subscribed.wait(10)
    uplink.stop()
    agent = spawn_agent(cfg, log)
    assert wait_for(lambda: "gw-test-source" in broker.log() and "plant/+/notes" in broker.log(), timeout=60)
    pub = publisher(broker.port)
    for i in range(5):
        pub.note("plant/l1/notes", i)

    def stats() -> dict:
        rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
        return json.loads(out) if rc == 0 else {}

    assert wait_for(lambda: stats().get("rows") == 5, timeout=60), log.read_text()
    shutil.rmtree(state)
    assert stats() == {}  # "no outbox": what an operator would see without the fix, for good
    assert wait_for(lambda: log_events(log, "outbox.file_lost"), timeout=30), log.read_text()
    assert wait_for(lambda: stats().get("rows") == 5, timeout=30), log.read_text()
    assert wait_for(lambda: log_events(log, "outbox.lock_recreated"), timeout=30), log.read_text()
    assert stats()["daemon_pid"] == str(agent.proc.pid)
    rc, _, err = run(capsys, "outbox", "purge", "--config", str(cfg), "--yes")
    assert rc == 1 and "stop the daemon first" in err
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert "edge_agent_outbox_files_lost_total 1.0" in r.read().decode()
    for i in range(5, 10):
        pub.note("plant/l1/notes", i)
    assert wait_for(lambda: stats().get("rows") == 10, timeout=60), log.read_text()

    uplink.start()
    try:
        assert wait_for(lambda: len({m["input_id"] for m in consumer.json()}) == 10, timeout=60)
        assert agent.kill(15) == 0
    finally:
        consumer.close()
        uplink.stop()


_LIBFAKETIME = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))


@pytest.mark.slow
@pytest.mark.skipif(not _LIBFAKETIME, reason="libfaketime not installed (Debian: apt-get install faketime)")
def test_forward_clock_step_under_the_daemon_expires_nothing(tmp_path: Path, broker, publisher, capsys) -> None:
    """The real daemon under libfaketime: 20 results wait (uplink down, max_age_s 1 h), then the wall clock
    steps 40 days ahead (the monotonic clock does not, as with NTP). The first expiry (60 s after start) used
    to drop all 20; now it logs outbox.clock_step, moves the rows' stamps with the clock and drops nothing."""
    import os
    import signal
    import subprocess
    import sys

    from .kit import REPO
    from .kit.agent import log_events

    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    # libfaketime 0.9.10 with DONT_FAKE_MONOTONIC fails clock_nanosleep(TIMER_ABSTIME) with EINVAL, which is
    # what time.sleep uses: the daemon's sleeps go through select() instead (test harness only).
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import select, time\n"
        "def _sleep(s):\n"
        "    if s < 0:\n"
        "        raise ValueError('sleep length must be non-negative')\n"
        "    select.select([], [], [], s)\n"
        "time.sleep = _sleep\n")
    env = {**os.environ, "LD_PRELOAD": str(_LIBFAKETIME[0]), "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}
    base = agent_config(source_port=broker.port, sink_port=free_port(), outbox=tmp_path / "o.db")
    cfg = write_toml(tmp_path / "c.toml", merge(base, {"outbox": {"max_age_s": 3600}}))
    log = tmp_path / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "gw-test-source" in broker.log() and "plant/+/notes" in broker.log(), timeout=60), \
            log.read_text()
        pub = publisher(broker.port)
        for i in range(20):
            pub.note("plant/l1/notes", i)

        def rows() -> int:
            rc, out, _ = run(capsys, "outbox", "stats", "--config", str(cfg), "--json")
            return json.loads(out)["rows"] if rc == 0 else -1

        assert wait_for(lambda: rows() == 20, timeout=60), log.read_text()
        offset.write_text("+40d\n")
        assert wait_for(lambda: log_events(log, "outbox.clock_step") or log_events(log, "outbox.dropped"),
                        timeout=90), log.read_text()
        assert log_events(log, "outbox.dropped") == [], "rows expired by the clock step"
        step = log_events(log, "outbox.clock_step")[0]
        assert abs(step["step_s"] - 40 * 86400) < 120 and step["rows_restamped"] == 20
        assert rows() == 20 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, log.read_text()[-3000:]
