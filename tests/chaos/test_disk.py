"""A full disk: the outbox's bound drops the oldest rows (counted), or, when the disk itself fills first,
the agent stops acknowledging (back-pressure: the broker keeps the notes) and recovers once there is
space again. Never a crash, never a restart loop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..kit import wait_for
from .harness import TIMEOUT_S, seconds

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT_S)]


def test_outbox_bound_drops_oldest_counted_while_uplink_down(rig):
    """A 64 KiB outbox and a refused uplink: the oldest results are dropped, and exactly those are lost."""
    rig.configure(max_bytes=65536)
    rig.start_agent()
    feeder = rig.feed("bound")
    assert rig.wait_results(50)
    rig.proxy.refuse()
    time.sleep(seconds(6))  # ~600 results of ~500 bytes: several times the bound
    rig.proxy.heal()
    assert wait_for(lambda: rig.count("outbox.dropped") > 0, 10), "the bound never dropped anything"
    v = rig.finish("outbox bound (64 KiB) while uplink down", feeder, may_lose={nid for _, nid in feeder.sent})
    # Lost is what the bound dropped, counted in the log; nothing else.
    assert 0 < v.lost <= v.extra["outbox_dropped"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (room for SQLite's WAL, which grows to ~4 MiB before it checkpoints), mounted
    for the test; needs root."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the bounded-drop scenario runs without it)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free."""
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def test_disk_full_is_back_pressure_then_recovers(rig, small_disk):
    """The disk holding the outbox fills up (ENOSPC: SQLITE_FULL) with the uplink healthy. The agent must
    not ack what it cannot store: notes wait at the broker, the daemon keeps running, and once space is
    freed everything arrives."""
    rig.outbox = small_disk / "outbox.db"
    rig.configure()
    rig.start_agent()
    feeder = rig.feed("full")
    assert rig.wait_results(50)
    ballast = _fill(small_disk, 256 * 1024)
    assert wait_for(lambda: rig.count("pipeline.batch_failed") > 0, 30, 0.2), "the disk never filled"
    first = next(e for e in rig.lines() if e.get("event") == "pipeline.batch_failed")
    assert "disk is full" in first.get("exception", ""), first
    # Back-pressure: results stop while notes keep coming; none is acked, so none is lost.
    stalled_at = len({r["input_id"] for r in rig.results()})
    time.sleep(seconds(6))
    assert rig.agent.alive(), "the daemon died on a full disk"
    assert len({r["input_id"] for r in rig.results()}) < len(feeder.sent) - 300
    ballast.unlink()  # the operator frees space; the pipeline's next retry (backoff <= 30 s) goes through
    v = rig.finish("disk full (tmpfs) then freed", feeder, timeout=120,
                   extra={"stalled_at": stalled_at, "batch_failures": rig.count("pipeline.batch_failed")})
    assert v.lost == 0


def test_expire_failing_on_a_full_disk_does_not_stop_the_daemon(tmp_path, monkeypatch):
    """The periodic expire is a write; on a full disk it fails. That must not end Agent.run (systemd would
    restart it into the same failure every minute)."""
    import threading

    from edge_agent import agent as agent_mod
    from edge_agent import config
    from edge_agent.errors import OutboxError
    from edge_agent.mqtt.source import Source

    from ..kit.config import write_config

    cfg = config.load(write_config(tmp_path / "c.toml", source_port=1, sink_port=1, outbox=tmp_path / "o.db"),
                      environ={})
    a = agent_mod.Agent(cfg)
    a.source = Source(cfg.source, cfg.routes, "never-connected")  # not started: READY never comes, expire does
    a.outbox.open()
    a.outbox._conn.execute("PRAGMA query_only = 1")  # every write now fails inside SQLite, as on ENOSPC
    with pytest.raises(OutboxError):
        a.outbox.expire()
    calls = []
    real = a.outbox.expire
    monkeypatch.setattr(a.outbox, "expire", lambda: calls.append(1) or real())
    monkeypatch.setattr(agent_mod, "EXPIRE_EVERY_S", 0.05)
    stop = threading.Event()
    threading.Timer(2.5, stop.set).start()  # _serve ticks once a second
    a._serve(stop, None, None)  # returns when stop is set; raising here is the bug
    a.outbox.close()
    assert len(calls) >= 2, "expire was not retried"
