"""The outbox for the person on site (`edge-agent outbox stats|export|purge`): read and purge a file.

`stats` and `export` only read, through a read-only SQLite connection, so they are safe beside the
running daemon (WAL lets readers and the writer work at once) and never change or move the file.
`purge` deletes, so it takes the daemon's lock (OutboxLock) first and refuses while the daemon runs:
rows the sink has in flight would otherwise vanish under it. Topics are read through the store's row
codec (`split_retain`): a retained row shows, and matches a filter, by its MQTT topic.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from paho.mqtt.client import topic_matches_sub

from ..errors import OutboxError
from .lock import OutboxLock
from .store import BUSY_TIMEOUT_S, Record, split_retain

_CHUNK = 500


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if not path.exists():
        raise OutboxError(f"no outbox at {path} (has the daemon run with this config?)")
    target = path.resolve().as_uri() + "?mode=ro" if readonly else str(path)
    try:
        conn = sqlite3.connect(target, uri=readonly, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("SELECT 1 FROM outbox LIMIT 1")
    except sqlite3.Error as e:
        raise OutboxError(f"cannot read the outbox at {path}: {e}") from None
    return conn


def _selected(conn: sqlite3.Connection, topic: str | None, before: float | None) -> Iterator[tuple[int, str, int]]:
    """(seq, topic, size) of the rows a filter selects, oldest first. Topic filters are MQTT filters."""
    sql = "SELECT seq, topic, size FROM outbox" + (" WHERE created_at < ?" if before is not None else "")
    for seq, stored, size in conn.execute(sql + " ORDER BY seq", () if before is None else (before,)):
        t = split_retain(stored)[0]
        if topic is None or topic_matches_sub(topic, t):
            yield seq, t, size


def stats(path: Path) -> dict[str, Any]:
    with closing(_connect(path, readonly=True)) as conn:
        rows, size, oldest, newest = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created_at), MAX(created_at) FROM outbox").fetchone()
        topics: dict[str, int] = {}
        retained = 0
        for stored, n in conn.execute("SELECT topic, COUNT(*) FROM outbox GROUP BY topic"):
            t, retain = split_retain(stored)
            topics[t] = topics.get(t, 0) + n
            retained += n if retain else 0
    files = {s: Path(f"{path}{s}") for s in ("", "-wal")}
    return {
        "path": str(path),
        "rows": rows,
        "bytes": size,
        "file_bytes": sum(p.stat().st_size for p in files.values() if p.exists()),
        "oldest_created_at": oldest,
        "newest_created_at": newest,
        "oldest_age_s": None if oldest is None else round(time.time() - oldest, 3),
        "topics": dict(sorted(topics.items(), key=lambda kv: (-kv[1], kv[0]))),
        "retained": retained,
        "daemon_pid": OutboxLock.holder(path),
        # Drop counters live in the daemon's memory (since its start): see its metrics or its
        # outbox.dropped log lines. They are not kept in the file.
    }


def export(path: Path, out: TextIO, topic: str | None = None) -> int:
    """Write one JSON line per row (seq, id, topic, retain, created_at, payload), oldest first; return how
    many. A payload that is not UTF-8 comes as payload_b64 instead, so every line is valid JSON."""
    n = 0
    with closing(_connect(path, readonly=True)) as conn:
        for r in conn.execute("SELECT seq, id, topic, payload, created_at FROM outbox ORDER BY seq"):
            rec = Record.from_row(*r)
            if topic is not None and not topic_matches_sub(topic, rec.topic):
                continue
            row: dict[str, Any] = {"seq": rec.seq, "id": rec.id, "topic": rec.topic, "retain": rec.retain,
                                   "created_at": rec.created_at}
            try:
                row["payload"] = bytes(rec.payload).decode("utf-8")
            except UnicodeDecodeError:
                row["payload_b64"] = base64.b64encode(rec.payload).decode()
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def purge(path: Path, topic: str | None = None, older_than: float | None = None, *, dry_run: bool = False
          ) -> tuple[int, int]:
    """Delete the selected rows (all, by topic filter, and/or older than `older_than` seconds); return
    (rows, bytes). Raises OutboxError while the daemon holds the outbox."""
    before = None if older_than is None else time.time() - older_than
    with OutboxLock(path), closing(_connect(path, readonly=dry_run)) as conn:
        if dry_run:
            picked = list(_selected(conn, topic, before))
            return len(picked), sum(size for _, _, size in picked)
        conn.execute("BEGIN IMMEDIATE")
        try:
            picked = list(_selected(conn, topic, before))
            seqs = [seq for seq, _, _ in picked]
            for i in range(0, len(seqs), _CHUNK):
                chunk = seqs[i : i + _CHUNK]
                conn.execute(f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(picked), sum(size for _, _, size in picked)


def corrections(path: Path, task: str | None = None) -> Iterator[dict[str, Any]]:
    """The corrections received (edge_agent.feedback), oldest first, as training rows: {"text", "label"} or
    {"text", "fields"}, with the task, when, where from, and whether the live result agreed."""
    with closing(_connect(path, readonly=True)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'feedback'").fetchone() is None:
            return  # an outbox from before corrections: none
        sql = "SELECT received_at, task, text, label, fields, result_id, agreed, source FROM feedback"
        args: tuple = ()
        if task is not None:
            sql, args = sql + " WHERE task = ?", (task,)
        for received_at, name, text, label, fields, rid, agreed, source in conn.execute(sql + " ORDER BY seq", args):
            row: dict[str, Any] = {"text": text, "task": name}
            if label is not None:
                row["label"] = label
            else:
                row["fields"] = json.loads(fields)
            row.update(result_id=rid, agreed=None if agreed is None else bool(agreed), received_at=received_at,
                       source=source)
            yield row


def correction_stats(path: Path) -> dict[str, Any]:
    """Per task: corrections, per label (or field), and how often the live result already agreed."""
    tasks: dict[str, dict[str, Any]] = {}
    for row in corrections(path):
        t = tasks.setdefault(row["task"], {"corrections": 0, "labels": {}, "fields": {}, "compared": 0, "agreed": 0})
        t["corrections"] += 1
        if "label" in row:
            t["labels"][row["label"]] = t["labels"].get(row["label"], 0) + 1
        else:
            for f in row["fields"]:
                t["fields"][f] = t["fields"].get(f, 0) + 1
        if row["agreed"] is not None:
            t["compared"] += 1
            t["agreed"] += row["agreed"]
    return {"path": str(path), "tasks": tasks}
