"""The power-cut filesystem itself: it must forget exactly what was never synced, or the power-cut test
proves nothing. Then the outbox on it, directly: the defect the power-cut test found (a fresh outbox
directory, never synced into its parent, lost whole with its committed rows) stays fixed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import OutboxConfig
from edge_agent.outbox.store import Outbox

from .mount import LazyMount, require_fuse


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LazyMount]:
    require_fuse()
    m = LazyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lazyfs.sock").mount()
    try:
        yield m
    finally:
        m.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reboot(disk: LazyMount, *users: object) -> dict:
    """Cut, close what still has files open (a busy mount does not unmount), unmount."""
    report = disk.cut()
    for u in users:
        with contextlib.suppress(Exception):
            u.close()  # type: ignore[attr-defined]
    disk.unmount()
    return report


def test_unsynced_data_and_names_are_lost_synced_ones_kept(disk: LazyMount) -> None:
    mnt = disk.mountpoint
    _fsync(mnt)  # nothing pending at the root yet
    (mnt / "kept").write_bytes(b"old")
    _fsync(mnt / "kept")
    _fsync(mnt)  # "kept" and its 3 bytes are durable
    with open(mnt / "kept", "r+b") as f:
        f.write(b"NEW, never synced")  # overwrites and extends: all of it pending
    (mnt / "renamed").write_bytes(b"x")
    _fsync(mnt / "renamed")
    _fsync(mnt)
    (mnt / "named").write_bytes(b"data synced, name not")
    _fsync(mnt / "named")
    os.rename(mnt / "renamed", mnt / "moved")  # not synced: the old name comes back
    (mnt / "dir").mkdir()
    (mnt / "dir" / "f").write_bytes(b"in a directory whose own name was never synced")
    _fsync(mnt / "dir" / "f")
    _fsync(mnt / "dir")
    report = _reboot(disk)
    assert report["unsynced_bytes"]["kept"] == len(b"NEW, never synced")
    assert sorted(p.name for p in disk.backing.iterdir()) == ["kept", "renamed"]
    assert (disk.backing / "kept").read_bytes() == b"old"
    assert (disk.backing / "renamed").read_bytes() == b"x"


def test_a_durable_name_without_durable_data_comes_back_empty(disk: LazyMount) -> None:
    (disk.mountpoint / "f").write_bytes(b"never synced")
    _fsync(disk.mountpoint)
    _reboot(disk)
    assert (disk.backing / "f").read_bytes() == b""


def test_the_armed_write_freezes_everything(disk: LazyMount) -> None:
    f = disk.mountpoint / "f"
    f.write_bytes(b"")
    _fsync(disk.mountpoint)
    disk.arm("f", 2)
    fd = os.open(f, os.O_RDWR)
    os.write(fd, b"a")
    os.fsync(fd)  # durable: before the trap
    with pytest.raises(OSError):
        os.write(fd, b"b")  # the 2nd write: the power goes
    with pytest.raises(OSError):
        os.fsync(fd)  # too late
    with contextlib.suppress(OSError):
        os.close(fd)  # the flush on close fails too
    assert disk.wait(1)["trigger"] == "write #2 to f"
    disk.unmount()
    assert (disk.backing / "f").read_bytes() == b"a"


def test_sqlite_without_fsync_loses_commits_here_and_full_keeps_them(disk: LazyMount) -> None:
    """The control experiment: the filesystem does catch a store that acks before it syncs."""
    for mode, name in (("OFF", "off.db"), ("FULL", "full.db")):
        with contextlib.closing(sqlite3.connect(disk.mountpoint / name, isolation_level=None)) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={mode}")
            c.execute("CREATE TABLE t (x)")
            for i in range(50):
                c.execute("INSERT INTO t VALUES (?)", (i,))
    # Connections closed: SQLite checkpointed and removed each -wal (synced only under FULL). Power-cut
    # after one more round of commits, left open this time.
    conns = []
    for mode, name in (("OFF", "off.db"), ("FULL", "full.db")):
        c = sqlite3.connect(disk.mountpoint / name, isolation_level=None)
        c.execute(f"PRAGMA synchronous={mode}")
        for i in range(50, 100):
            c.execute("INSERT INTO t VALUES (?)", (i,))
        conns.append(c)
    _reboot(disk, *conns)
    counts = {}
    for name in ("off.db", "full.db"):
        with contextlib.closing(sqlite3.connect(disk.backing / name)) as c:
            try:
                counts[name] = c.execute("SELECT COUNT(*) FROM t").fetchone()[0]
            except sqlite3.Error:
                counts[name] = 0  # the table itself never reached the disk
    assert counts["full.db"] == 100
    assert counts["off.db"] < 100, counts


def test_a_fresh_outbox_directory_survives_the_first_power_cut(disk: LazyMount) -> None:
    """Failed before the fix: SQLite synced the outbox's own directory, but nothing synced the new
    directories above it, so the cut took the whole outbox, committed rows and all."""
    path = disk.mountpoint / "var" / "lib" / "edge-agent" / "outbox.db"
    ob = Outbox(OutboxConfig(path=path)).open()
    ob.put_many([(f"r{i}", "edge/results/x", b"{}") for i in range(10)])  # returned: durable, may be acked
    _reboot(disk, ob)
    with contextlib.closing(sqlite3.connect(disk.backing / "var" / "lib" / "edge-agent" / "outbox.db")) as c:
        assert c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 10
