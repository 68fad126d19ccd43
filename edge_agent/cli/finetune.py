"""`edge-agent finetune generator`: LoRA-tune a built generator on span examples (workstation, `[train]`
extra), merge and export it as an int8 model directory with its manifest (edge_agent.train.finetune_generator)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .exit_codes import guarded
from .generator import _fields


def cmd_generator(args: argparse.Namespace) -> int:
    from ..train.finetune_generator import finetune_generator

    manifest = finetune_generator(
        args.model, args.examples, args.out, _fields(args.fields), name=args.name, fmt=args.format,
        max_examples=args.max_examples, epochs=args.epochs, lr=args.lr, rank=args.rank,
        batch_size=args.batch_size, seed=args.seed, threads=args.threads, base_cache=args.base_cache,
        eval_path=args.eval, progress=lambda m: print(f"edge-agent finetune: {m}", file=sys.stderr, flush=True))
    info = manifest["finetune"]
    print(json.dumps({"model": str(args.out), "name": manifest["name"], "base": info["base"]["name"],
                      **{k: info[k] for k in ("steps", "loss_before", "loss_after", "epoch_loss", "train_seconds",
                                              "seconds") if k in info},
                      **{k: info[k] for k in ("eval_loss_before", "eval_loss_after") if k in info}}))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("finetune", help="fine-tune a model on examples (needs the [train] extra)"
                                ).add_subparsers(dest="finetune_command", required=True)
    p = sub.add_parser("generator", help="LoRA on a built generator, merged, exported as an int8 model directory")
    p.add_argument("--model", type=Path, required=True,
                   help="the built generator to start from (its manifest names the weights to rebuild)")
    p.add_argument("--examples", type=Path, required=True,
                   help='JSONL {"text", "fields": {name: value|null}}, each value a span of the text')
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--name", help="the model's name in its manifest (default: the --out folder's name)")
    p.add_argument("--fields", help="comma-separated field names (default: asset,symptom,action), as the task "
                                    "that will run the model declares them")
    p.add_argument("--format", choices=("edge-agent", "maintie"), default="edge-agent",
                   help="maintie: MaintIE rows; the first PhysicalObject/State/Activity span as asset/symptom/action")
    p.add_argument("--max-examples", type=int, help="a seeded random sample of this many examples")
    p.add_argument("--eval", type=Path, help="held-out examples (same format): answer loss before and after")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--base-cache", type=Path,
                   help="keep the rebuilt fp32 base weights here and reuse them next time")
    p.set_defaults(func=guarded(cmd_generator))
