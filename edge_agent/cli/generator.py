"""`edge-agent generator predict`: extract fields from JSONL notes with an int8 generator, as the daemon does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .exit_codes import guarded
from .jsonl import predict_lines


def _fields(spec: str | None) -> dict[str, str]:
    """--fields a,b,c: the default fields' descriptions for their names; another name describes itself."""
    from ..config import _DEFAULT_FIELDS

    if spec is None:
        return dict(_DEFAULT_FIELDS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return {n: _DEFAULT_FIELDS.get(n, n.replace("_", " ")) for n in names}


def cmd_predict(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..config import GeneratorTaskConfig
    from ..message import Note
    from ..tasks.generator import GeneratorTask

    try:
        cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(args.model),
                                                  "fields": _fields(args.fields),
                                                  "intra_threads": args.threads})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError("--" + ".".join(str(p) for p in err["loc"]), err["msg"]) from None
    task = GeneratorTask("generator", cfg)

    try:
        predict_lines(sys.stdin, args.batch_size,
                      lambda texts: task.process([Note(text=t, topic="cli") for t in texts]), skip_blank=True)
    finally:
        task.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("generator", help="generator: extract fields from notes").add_subparsers(
        dest="generator_command", required=True)
    p = sub.add_parser("predict", help='JSONL {"text"} on stdin -> one JSON line {"fields", "ungrounded"} '
                                       "per input on stdout, same order")
    p.add_argument("--model", type=Path, required=True, help="generator directory (edge-agent models build)")
    p.add_argument("--fields", help="comma-separated field names (default: asset,symptom,action)")
    p.add_argument("--threads", type=int, default=0, help="threads (0: min(4, cores))")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=guarded(cmd_predict))
