"""Durable appends per second to the outbox: group commit against one commit per message.

Both sides run the same ``edge_agent.outbox.store.Outbox`` (SQLite, WAL, synchronous=FULL) on the same disk in
the same run; only the number of rows per ``put_many`` (= per transaction = per fsync) differs:

- ours: ``put_many`` of 64 rows, as the pipeline commits a batch (pipeline.batch_max default 64).
- peer: ``put_many`` of one row, i.e. commit (and fsync) each message before acking it.

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

BATCH = 64
SIDES = ["group", "single"]


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


def _one(side: str, db: Path, rows: list[tuple[str, str, bytes]], n: int) -> float:
    size = BATCH if side == "group" else 1
    chunks = [[rows[(i + k) % len(rows)] for k in range(size)] for i in range(0, n, size)]
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
    n = {"group": BATCH * (300 if quick else 1500), "single": 1000 if quick else 4000}
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
    }]
