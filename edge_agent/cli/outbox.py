"""`edge-agent outbox stats|export|purge --config PATH`: the outbox, for the person on site (see `outbox.admin`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ..outbox.admin import export, purge, stats
from .exit_codes import guarded


def outbox_path(args: argparse.Namespace) -> Path:
    """The outbox file the --config names (the feedback commands read it too)."""
    from .. import config

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
    s = stats(outbox_path(args))
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
    path = outbox_path(args)
    if args.out is None:
        n = export(path, sys.stdout, args.topic)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            n = export(path, fh, args.topic)
    print(f"edge-agent: exported {n} row(s)", file=sys.stderr)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    path = outbox_path(args)
    n, size = purge(path, args.topic, args.older_than, dry_run=not args.yes)
    if not args.yes:
        print(f"edge-agent: this would delete {n} row(s), {_size(size)}, for good; add --yes to do it",
              file=sys.stderr)
        return 1
    print(f"edge-agent: deleted {n} row(s), {_size(size)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ob = sub.add_parser("outbox", help="inspect, export or purge the outbox (on site)")
    cmds = ob.add_subparsers(dest="outbox_cmd", required=True)

    p = cmds.add_parser("stats", help="rows, bytes, oldest row, per-topic counts (safe while the daemon runs)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=guarded(cmd_stats))

    p = cmds.add_parser("export", help="rows as JSON lines, oldest first (safe while the daemon runs)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    p.add_argument("--topic", metavar="FILTER", help="only rows whose topic matches this MQTT filter")
    p.set_defaults(func=guarded(cmd_export))

    p = cmds.add_parser("purge", help="delete rows for good (the daemon must be stopped)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--yes", action="store_true", help="really delete (without it: say what would go)")
    p.add_argument("--topic", metavar="FILTER", help="only rows whose topic matches this MQTT filter")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="only rows older than this")
    p.set_defaults(func=guarded(cmd_purge))
