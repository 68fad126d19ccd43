"""`edge-agent tagger train|predict`: train a token-tagger head on span-annotated examples, or tag JSONL."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tasks.tagger import Features, TaggerHead
from .exit_codes import guarded
from .jsonl import predict_lines

if TYPE_CHECKING:
    from ..models.encoder import Encoder


def _encoder(args: argparse.Namespace) -> Encoder:
    from ..models.encoder import Encoder

    return Encoder(args.model, intra_threads=args.threads, max_length=args.max_length)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.tagger import load_examples, train

    examples = load_examples(args.examples, args.format)
    dev = load_examples(args.dev, args.format) if args.dev else None
    opts = replace(Features(), **{k: v for k in ("epochs", "seed") if (v := getattr(args, k)) is not None})
    head = train(_encoder(args), examples, opts, dev, lambda m: print(f"edge-agent tagger: {m}", file=sys.stderr))
    head.save(args.out)
    print(json.dumps({"head": str(args.out), "types": head.types, **head.info}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    encoder = _encoder(args)
    head = TaggerHead.load(args.head, encoder.manifest)

    def tag(texts: list[str]) -> list[dict[str, Any]]:
        return [{"entities": e} for e in head.predict(texts, encoder.token_states(texts))]

    predict_lines(sys.stdin, args.batch_size, tag)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("tagger", help="token tagger: train a head, tag notes").add_subparsers(
        dest="tagger_command", required=True)
    train_p = sub.add_parser("train", help="train a tagger head from span-annotated examples")
    predict_p = sub.add_parser("predict", help="JSONL {text} on stdin -> JSONL {entities} on stdout, same order")
    for p in (train_p, predict_p):
        p.add_argument("--model", type=Path, required=True, help="encoder directory (edge-agent models build)")
        p.add_argument("--threads", type=int, default=0, help="encoder threads (0: one per core)")
        p.add_argument("--max-length", type=int, default=128, help="tokens per note; longer notes are truncated")
    train_p.add_argument("--examples", type=Path, required=True,
                         help='JSONL rows {"text", "entities": [{"start", "end", "type"}]}, character offsets')
    train_p.add_argument("--out", type=Path, required=True, help="head file to write (.npz)")
    train_p.add_argument("--dev", type=Path, help="held-out rows: keep the epoch with the best dev micro-F1")
    train_p.add_argument("--format", choices=("edge-agent", "maintie"), default="edge-agent",
                         help="maintie: MaintIE rows (word tokens, token offsets), top-level types")
    train_p.add_argument("--epochs", type=int)
    train_p.add_argument("--seed", type=int)
    train_p.set_defaults(func=guarded(cmd_train))
    predict_p.add_argument("--head", type=Path, required=True)
    predict_p.add_argument("--batch-size", type=int, default=32)
    predict_p.set_defaults(func=guarded(cmd_predict))
