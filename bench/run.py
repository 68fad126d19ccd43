"""Run one benchmark against its named peer in the same run and write JSON.

    python bench/run.py NAME [--quick] --json OUT      # or: python -m bench.run NAME ... (repository root)

Each benchmark lives in bench/<name>.py and exposes ``run(quick: bool) -> list[dict]`` returning rows of
``{"name", "ours", "peer", "ratio", "unit", ...}`` with ratio = ours / peer (higher is better).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# The one sys.path entry of bench/: the repository root, so that `python bench/run.py` finds the `bench` and
# `tests` packages (a bench imports tests/kit) as `python -m bench.run` does. Every other entry point of
# bench/ runs as a module: `python -m bench.NAME`.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAMES = ("passthrough", "outbox_append", "drain", "classify", "generate", "scale", "sparkplug", "soak")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=NAMES)
    ap.add_argument("--quick", action="store_true", help="finish in under two minutes on 2 cores")
    ap.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    args = ap.parse_args(argv)
    rows = importlib.import_module(f"bench.{args.name}").run(quick=args.quick)
    for row in rows:
        if row.get("peer"):
            row["ratio"] = round(row["ours"] / row["peer"], 3)
    text = json.dumps(rows, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
