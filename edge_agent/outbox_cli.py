"""`edge-agent outbox stats|export|purge --config PATH`: the outbox, for the person on site.

`stats` and `export` only read, through a read-only SQLite connection, so they are safe beside the
running daemon (WAL lets readers and the writer work at once) and never change or move the file.
`purge` deletes, so it takes the daemon's lock (OutboxLock) first and refuses while the daemon runs:
rows the sink has in flight would otherwise vanish under it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from paho.mqtt.client import topic_matches_sub

from .errors import ConfigError, OutboxError
from .outbox import BUSY_TIMEOUT_S
from .outbox_lock import OutboxLock

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
    for seq, t, size in conn.execute(sql + " ORDER BY seq", () if before is None else (before,)):
        if topic is None or topic_matches_sub(topic, t):
            yield seq, t, size


def stats(path: Path) -> dict[str, Any]:
    with closing(_connect(path, readonly=True)) as conn:
        rows, size, oldest, newest = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created_at), MAX(created_at) FROM outbox").fetchone()
        topics = dict(conn.execute("SELECT topic, COUNT(*) FROM outbox GROUP BY topic ORDER BY 2 DESC, 1"))
    files = {s: Path(f"{path}{s}") for s in ("", "-wal")}
    return {
        "path": str(path),
        "rows": rows,
        "bytes": size,
        "file_bytes": sum(p.stat().st_size for p in files.values() if p.exists()),
        "oldest_created_at": oldest,
        "newest_created_at": newest,
        "oldest_age_s": None if oldest is None else round(time.time() - oldest, 3),
        "topics": topics,
        "daemon_pid": OutboxLock.holder(path),
        # Drop counters live in the daemon's memory (since its start): see its metrics or its
        # outbox.dropped log lines. They are not kept in the file.
    }


def export(path: Path, out: TextIO, topic: str | None = None) -> int:
    """Write one JSON line per row (seq, id, topic, created_at, payload), oldest first; return how many.
    A payload that is not UTF-8 comes as payload_b64 instead, so every line is valid JSON."""
    n = 0
    with closing(_connect(path, readonly=True)) as conn:
        for seq, rid, t, created_at, payload in conn.execute(
                "SELECT seq, id, topic, created_at, payload FROM outbox ORDER BY seq"):
            if topic is not None and not topic_matches_sub(topic, t):
                continue
            row: dict[str, Any] = {"seq": seq, "id": rid, "topic": t, "created_at": created_at}
            try:
                row["payload"] = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                row["payload_b64"] = base64.b64encode(payload).decode()
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


# ---------------------------------------------------------------- the commands

def _path(args: argparse.Namespace) -> Path:
    from . import config

    return Path(config.load(args.config).outbox.path)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") + f" ({_age(time.time() - ts)} ago)"


def _age(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(s) >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def cmd_stats(args: argparse.Namespace) -> int:
    s = stats(_path(args))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    pid = s["daemon_pid"]
    print(f"outbox {s['path']}")
    print(f"  daemon   {f'running (pid {pid})' if pid else 'not running'}")
    print(f"  rows     {s['rows']}")
    print(f"  bytes    {_size(s['bytes'])} (payloads and topics)")
    print(f"  on disk  {_size(s['file_bytes'])} (database and WAL)")
    print(f"  oldest   {_when(s['oldest_created_at'])}")
    print(f"  newest   {_when(s['newest_created_at'])}")
    print("  dropped  not kept in the file: see edge_agent_outbox_dropped_total or the outbox.dropped log lines")
    if s["topics"]:
        width = max(len(t) for t in s["topics"])
        print("  per topic:")
        for t, n in s["topics"].items():
            print(f"    {t:<{width}}  {n}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path = _path(args)
    if args.out is None:
        n = export(path, sys.stdout, args.topic)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            n = export(path, fh, args.topic)
    print(f"edge-agent: exported {n} row(s)", file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    path = _path(args)
    n, size = purge(path, args.topic, args.older_than, dry_run=not args.yes)
    if not args.yes:
        print(f"edge-agent: this would delete {n} row(s), {_size(size)}, for good; add --yes to do it",
              file=sys.stderr)
        return 1
    print(f"edge-agent: deleted {n} row(s), {_size(size)}")
    return 0


def _run(func: Any) -> Any:
    """Map the outcomes an operator meets to messages and exit codes: 2 bad config, 1 refused/failed."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ConfigError as e:
            print(f"edge-agent: invalid config: {e.field}: {e.message}", file=sys.stderr)
            return 2
        except OutboxError as e:
            print(f"edge-agent: {e}", file=sys.stderr)
            return 1

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    ob = sub.add_parser("outbox", help="inspect, export or purge the outbox (on site)")
    cmds = ob.add_subparsers(dest="outbox_cmd", required=True)

    p = cmds.add_parser("stats", help="rows, bytes, oldest row, per-topic counts (safe while the daemon runs)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(cmd_stats))

    p = cmds.add_parser("export", help="rows as JSON lines, oldest first (safe while the daemon runs)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    p.add_argument("--topic", metavar="FILTER", help="only rows whose topic matches this MQTT filter")
    p.set_defaults(func=_run(cmd_export))

    p = cmds.add_parser("purge", help="delete rows for good (the daemon must be stopped)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--yes", action="store_true", help="really delete (without it: say what would go)")
    p.add_argument("--topic", metavar="FILTER", help="only rows whose topic matches this MQTT filter")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="only rows older than this")
    p.set_defaults(func=_run(cmd_purge))
