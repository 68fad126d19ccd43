"""The `edge-agent` command. The only place that installs signal handlers."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import ConfigError, EdgeAgentError


def _fail_config(e: ConfigError) -> int:
    print(f"edge-agent: invalid config: {e.field}: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"  fix: {e.hint}", file=sys.stderr)
    return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    from . import config

    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        return _fail_config(e)
    print(
        f"{args.config}: ok (gateway {cfg.gateway_id!r}, {len(cfg.routes)} route(s), "
        f"source {cfg.source.host}:{cfg.source.port}, sink {cfg.sink.host}:{cfg.sink.port})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import config, logs
    from .agent import Agent

    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        return _fail_config(e)
    logs.configure(cfg.log.level, cfg.log.format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            print("edge-agent: second interrupt, exiting now", file=sys.stderr)
            os._exit(130)  # the outbox is crash-safe: unacked input is redelivered on restart
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        Agent(cfg).run(stop)
    except ConfigError as e:
        return _fail_config(e)
    except EdgeAgentError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-agent", description="MQTT notes in, on-device AI, durable results out.")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 naming the bad field")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_check_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
