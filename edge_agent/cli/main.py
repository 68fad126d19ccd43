"""The `edge-agent` command: the parser, one module per command group, one error → exit-code policy
(`exit_codes`). Only `run` installs signal handlers."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import classifier, feedback, finetune, generator, models, outbox, run, tagger


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-agent", description="MQTT notes in, on-device AI, durable results out.")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    models.add_parser(sub)
    classifier.add_parser(sub)
    tagger.add_parser(sub)
    generator.add_parser(sub)
    finetune.add_parser(sub)
    outbox.add_parser(sub)
    feedback.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
