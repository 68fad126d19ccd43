"""Durable appends per second to the outbox: group commit against one commit per message, and against the
physical ceiling (the same rows into a bare SQLite table).

All sides write SQLite in WAL mode with synchronous=FULL on the same disk in the same run:

- ours: ``Outbox.put_many`` of 256 rows, as the pipeline commits a full batch (pipeline.batch_max default 256).
- peer ``outbox_append``: ``put_many`` of one row, i.e. commit (and fsync) each message before acking it.
- peer ``outbox_append_ceiling``: the same 256 rows per transaction ``executemany``-ed into a bare table of the
  same columns (no bounds, no counters, no lock): what SQLite itself does on this disk, the ceiling.

Rows are real result payloads (``common.make_results``: the patterns task over realistic notes, about
700 bytes of JSON each). Each round opens a fresh outbox file; rounds alternate which side goes first
and the figure is the median. rate = rows / wall time of the put_many calls (open/close not counted).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import rounds_of
from edge_agent.config import OutboxConfig
from edge_agent.outbox.store import Outbox
from tests.kit import REPO

BATCH = 256
SIDES = ["group", "single", "bare"]


def _rows(n: int) -> tuple[list[tuple[str, str, bytes]], str]:
    try:
        from bench.common import make_results

        return make_results(n), "common.make_results (patterns task results)"
    except Exception as e:  # the bench measures the outbox: do not let another module's bug stop it
        text = "P-101 discharge pressure 7.2 bar, alarm E-042 cleared after reset; vibration 4.1 mm/s"
        rows = [(f"{k:032x}", "edge/results/plant/line1/notes",
                 json.dumps({"schema": "edge-agent/result/1", "id": f"{k:032x}", "text": text,
                             "pad": "x" * 380}).encode()) for k in range(n)]
        return rows, f"synthetic JSON (make_results failed: {e!r})"


def _fs(path: Path) -> str:
    """The filesystem type and device under path, from /proc/mounts (longest matching mount point)."""
    best, real = ("?", "?", ""), os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                    best = (kind, dev, mnt)
    except OSError:
        pass
    return f"{best[0]} on {best[1]}"


def _bare(db: Path, chunks: list[list[tuple[str, str, bytes]]]) -> float:
    """The ceiling: the rows into a bare SQLite table, WAL + synchronous=FULL, one transaction per chunk."""
    import sqlite3

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, topic TEXT, size INTEGER, "
                 "created_at REAL, payload BLOB)")
    t0 = time.perf_counter()
    for chunk in chunks:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (id, topic, size, created_at, payload) VALUES (?,?,?,?,?)",
                         [(rid, topic, len(p), t0, p) for rid, topic, p in chunk])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return sum(len(c) for c in chunks) / elapsed


def _one(side: str, db: Path, rows: list[tuple[str, str, bytes]], n: int) -> float:
    size = 1 if side == "single" else BATCH
    chunks = [[rows[(i + k) % len(rows)] for k in range(size)] for i in range(0, n, size)]
    if side == "bare":
        rate = _bare(db, chunks)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        return rate
    with Outbox(OutboxConfig(path=db)) as ob:
        t0 = time.perf_counter()
        for chunk in chunks:
            ob.put_many(chunk)
        elapsed = time.perf_counter() - t0
        assert ob.stats().count == len(chunks) * size
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return len(chunks) * size / elapsed


def run(quick: bool) -> list[dict]:
    rounds = 3 if quick else 5
    n = {"group": BATCH * (80 if quick else 400), "single": 1000 if quick else 4000}
    n["bare"] = n["group"]
    rows, source = _rows(2048)
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    # A temp dir under the system temp dir; the row says which filesystem that is (tmpfs would make
    # fsync free and the figure meaningless, so it is named).
    base = os.environ.get("EDGE_AGENT_BENCH_DIR") or tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-", dir=base) as tmp:
        work = Path(tmp)
        same_disk = os.stat(work).st_dev == os.stat(REPO).st_dev
        for r, side in rounds_of(SIDES, rounds):
            rates[side].append(round(_one(side, work / f"{side}-{r}.db", rows, n[side]), 1))
    return [{
        "name": "outbox_append",
        "ours": round(statistics.median(rates["group"]), 1),
        "peer": round(statistics.median(rates["single"]), 1),
        "unit": "results/s",
        "peer_name": "same outbox, one commit per message",
        "batch": BATCH,
        "synchronous": "FULL",
        "journal_mode": "WAL",
        "rows": {"ours": n["group"], "peer": n["single"]},
        "payload": f"{source}, mean {statistics.mean(len(p) for _, _, p in rows):.0f} bytes",
        "dir": f"{base} ({_fs(Path(base))}; {'same' if same_disk else 'NOT the same'} device as the repo)",
        "stat": f"median of {rounds} alternating rounds, fresh outbox file each",
        "samples_ours": rates["group"],
        "samples_peer": rates["single"],
        "cores": os.cpu_count(),
    }, {
        "name": "outbox_append_ceiling",
        "ours": round(statistics.median(rates["group"]), 1),
        "peer": round(statistics.median(rates["bare"]), 1),
        "unit": "results/s",
        "peer_name": "the same rows into a bare SQLite table (WAL, synchronous=FULL), same batch: the ceiling",
        "batch": BATCH,
        "samples_ours": rates["group"],
        "samples_peer": rates["bare"],
        "stat": f"median of {rounds} alternating rounds, fresh file each",
    }]
