"""Run one benchmark against its named peer in the same run and write JSON.

    python bench/run.py NAME [--quick] --json OUT      # or: python -m bench.run NAME ... (repository root)

Each benchmark lives in bench/<name>.py and exposes ``run(quick: bool) -> list[dict]`` returning rows of
``{"name", "ours", "peer", "ratio", "unit", ...}`` with ratio = ours / peer (higher is better). Every row
also gets ``machine``: the CPU model, its int8-relevant flags, cores and load average (bench.common.machine).

Before it runs, a bench's needs are met or named: ``MODELS`` (default models it reads from models/) are
built when missing, through ``edge-agent models build`` as .ci/setup does; ``peers()`` (bench.common.Peer:
interpreters, modules, programs it compares against) are checked, and a missing one is named with the
hint to run ``bash bench/setup``, exit status 3, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

# The one sys.path entry of bench/: the repository root, so that `python bench/run.py` finds the `bench` and
# `tests` packages (a bench imports tests/kit) as `python -m bench.run` does. Every other entry point of
# bench/ runs as a module: `python -m bench.NAME`.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAMES = ("passthrough", "outbox_append", "drain", "classify", "generate", "scale", "sparkplug", "soak", "bridge",
         "footprint", "latency")
MISSING_PEER = 3  # exit status: a peer is not installed
MODEL_BUILD_FAILED = 4


def missing_peers(mod: object) -> list[str]:
    peers = getattr(mod, "peers", None)
    return [why for why in (p.missing() for p in (peers() if peers else [])) if why]


def ensure_models(mod: object) -> None:
    """Build every default model the bench reads (`MODELS`) that models/ lacks."""
    for name in getattr(mod, "MODELS", ()):
        out = REPO / "models" / name
        if (out / "manifest.json").exists():
            continue
        print(f"bench/run: building missing model {name} into models/{name} (edge-agent models build)",
              file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "edge_agent", "models", "build", name, "--out", str(out)],
                              cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(MODEL_BUILD_FAILED)


def main(argv: list[str] | None = None) -> int:
    from bench.common import SETUP_HINT, machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=NAMES)
    ap.add_argument("--quick", action="store_true", help="finish in under two minutes on 2 cores")
    ap.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    args = ap.parse_args(argv)
    mod = importlib.import_module(f"bench.{args.name}")
    missing = missing_peers(mod)
    if missing:
        print(f"bench/run: {args.name} cannot run, its peer is missing:", file=sys.stderr)
        for why in missing:
            print(f"  - {why}", file=sys.stderr)
        print(f"bench/run: {SETUP_HINT}", file=sys.stderr)
        return MISSING_PEER
    ensure_models(mod)
    rows = mod.run(quick=args.quick)
    where = machine()
    for row in rows:
        if "ratio" not in row:  # a bench may set its own (None where ours / peer means nothing)
            numbers = isinstance(row.get("ours"), (int, float)) and row.get("peer")
            row["ratio"] = round(row["ours"] / row["peer"], 3) if numbers else None
        row["machine"] = where
    text = json.dumps(rows, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
