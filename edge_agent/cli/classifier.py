"""`edge-agent classifier train|predict`: train a head on labelled examples, or run one over JSONL."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..tasks.classifier import ClassifierTask, Features, encoder_sha256
from .exit_codes import guarded
from .jsonl import predict_lines

if TYPE_CHECKING:
    from ..models.encoder import Encoder


def _encoder(args: argparse.Namespace) -> Encoder:
    from ..models.encoder import Encoder

    return Encoder(args.model, intra_threads=args.threads)


def cmd_train(args: argparse.Namespace) -> int:
    from ..tasks.fit import train
    from ..train.classifier import read_examples

    texts, labels = read_examples(args.examples)
    dev = read_examples(args.dev) if args.dev else None
    encoder = _encoder(args)
    features = Features(w_emb=args.emb_weight, w_char=args.char_weight, center=not args.no_center)
    start = time.monotonic()
    emb = encoder.embed(texts) if features.w_emb else None
    head = train(texts, labels, emb, encoder_sha=encoder_sha256(encoder), features=features, c=args.c,
                 meta={"encoder": encoder.manifest.get("name"), "examples_file": str(args.examples)})
    seconds = time.monotonic() - start
    head.save(args.out)
    print(f"{args.out}: {len(texts)} examples, {len(head.labels)} labels, trained in {seconds:.1f} s "
          f"(embedding + fit + calibration, temperature {head.temperature:.2f})")
    if dev:
        dev_texts, dev_labels = dev
        p = head.probabilities(encoder.embed(dev_texts) if features.w_emb else None, dev_texts)
        acc = float(np.mean([head.labels[i] == y for i, y in zip(p.argmax(axis=1), dev_labels, strict=True)]))
        print(f"dev: {len(dev_texts)} examples, accuracy {acc:.3f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..config import ClassifierTaskConfig

    cfg = ClassifierTaskConfig.model_validate({"kind": "classifier", "model": args.model, "head": args.head})
    task = ClassifierTask("predict", cfg, _encoder(args))

    def classify(texts: list[str]) -> list[dict[str, Any]]:
        results = task.results(texts)
        for r in results:
            del r["review"]
        return results

    predict_lines(sys.stdin, args.batch_size, classify)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Make the head version before the active one active again (the daemon must be stopped: it holds the
    outbox file's lock); the next start uses it. Back past version 1 is the configured head or zero-shot."""
    from .. import config
    from ..learn import meta_key
    from ..outbox.lock import OutboxLock
    from ..outbox.store import Outbox

    cfg = config.load(args.config)
    lock = OutboxLock(cfg.outbox.path).acquire()  # refuses while the daemon runs
    try:
        with Outbox(cfg.outbox) as ob:
            raw = ob.get_meta(meta_key(args.task))
            state = json.loads(raw) if raw else {"active": 0, "versions": []}
            versions = sorted(v["version"] for v in state["versions"])
            if not state["active"]:
                print(f"edge-agent: task {args.task!r} uses no learned head; nothing to roll back", file=sys.stderr)
                return 1
            before = [v for v in versions if v < state["active"]]
            was, state["active"] = state["active"], (before[-1] if before else 0)
            ob.set_meta(meta_key(args.task), json.dumps(state))
    finally:
        lock.release()
    now = f"head v{state['active']}" if state["active"] else "the configured head (or zero-shot labels)"
    print(f"edge-agent: task {args.task!r}: head v{was} -> {now}; start the daemon to use it")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("classifier", help="train a classifier head, or run one over JSONL")
    sub = p.add_subparsers(dest="classifier_command", required=True)
    t = sub.add_parser("train", help="train a head from labelled examples (numpy, seconds)")
    t.add_argument("--model", type=Path, required=True, help="encoder directory (edge-agent models build)")
    t.add_argument("--examples", type=Path, required=True, help='JSONL rows {"text", "label"}')
    t.add_argument("--out", type=Path, required=True, help="head file to write (.npz)")
    t.add_argument("--dev", type=Path, help="JSONL rows {text, label} to report accuracy on")
    t.add_argument("--c", type=float, default=10.0, help="inverse L2 strength (default: best on FMC dev)")
    t.add_argument("--emb-weight", type=float, default=Features.w_emb, help="0 = character n-grams only")
    t.add_argument("--char-weight", type=float, default=Features.w_char, help="0 = embedding only")
    t.add_argument("--no-center", action="store_true",
                   help="use the embeddings as they are (default: subtract the examples' mean, renormalise)")
    t.add_argument("--threads", type=int, default=0, help="encoder threads (0 = one per core)")
    t.set_defaults(func=guarded(cmd_train))
    q = sub.add_parser("predict", help='JSONL {"text"} on stdin -> {"label", "score", "scores"} on stdout')
    q.add_argument("--model", type=Path, required=True, help="the encoder the head was trained on")
    q.add_argument("--head", type=Path, required=True)
    q.add_argument("--batch-size", type=int, default=64, help="lines per encoder call")
    q.add_argument("--threads", type=int, default=0, help="encoder threads (0 = one per core)")
    q.set_defaults(func=guarded(cmd_predict))
    r = sub.add_parser("rollback", help="back to the previous head a task learned on the gateway (daemon stopped)")
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("--task", required=True, help="the classifier task (learn = true)")
    r.set_defaults(func=guarded(cmd_rollback))
    return p
