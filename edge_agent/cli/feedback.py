"""`edge-agent feedback export|stats --config PATH`: the corrections received (see edge_agent.feedback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..outbox.admin import correction_stats, corrections
from .exit_codes import guarded
from .outbox import outbox_path


def cmd_export(args: argparse.Namespace) -> int:
    n = 0
    for row in corrections(outbox_path(args), args.task):
        print(json.dumps(row, ensure_ascii=False))
        n += 1
    print(f"edge-agent: exported {n} correction(s)", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    s = correction_stats(outbox_path(args))
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return 0
    print(f"corrections in {s['path']}")
    if not s["tasks"]:
        print("  none yet")
    for name, t in sorted(s["tasks"].items()):
        agreement = f", the live result agreed {t['agreed']} of {t['compared']}" if t["compared"] else ""
        print(f"  {name}: {t['corrections']}{agreement}")
        for what, n in sorted({**t["labels"], **t["fields"]}.items(), key=lambda kv: -kv[1]):
            print(f"    {what:<24} {n}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    fb = sub.add_parser("feedback", help="the corrections received on the feedback topic")
    cmds = fb.add_subparsers(dest="feedback_cmd", required=True)
    p = cmds.add_parser("export", help="corrections as JSON lines, oldest first ({text, label|fields, task, ...})")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--task", help="only this task's corrections")
    p.set_defaults(func=guarded(cmd_export))
    p = cmds.add_parser("stats", help="corrections per task and label, and the live model's agreement")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=guarded(cmd_stats))
