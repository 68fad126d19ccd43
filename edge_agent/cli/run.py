"""`edge-agent run` and `edge-agent check-config`. `run` is the only place that installs signal handlers."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .exit_codes import guarded


def cmd_check_config(args: argparse.Namespace) -> int:
    from .. import config
    from ..mqtt.client import preflight

    cfg = config.load(args.config)
    # Outside the service there are no systemd credentials to read: say so rather than fail.
    has_creds = bool(os.environ.get("CREDENTIALS_DIRECTORY"))
    preflight(cfg, credentials=has_creds)
    if cfg.sink.protocol == "3.1.1":
        from ..mqtt.sink import SINK_311_HINT

        print(f"warning: sink.protocol = \"3.1.1\": {SINK_311_HINT}")
    if not has_creds and any(b.password_credential for b in (cfg.source, cfg.sink)):
        print("note: password_credential not checked (CREDENTIALS_DIRECTORY is set only inside the service)")
    print(
        f"{args.config}: ok (gateway {cfg.gateway_id!r}, {len(cfg.routes)} route(s), "
        f"source {cfg.source.host}:{cfg.source.port}, sink {cfg.sink.host}:{cfg.sink.port})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .. import config, logs
    from ..agent import Agent

    cfg = config.load(args.config)
    logs.configure(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            print("edge-agent: second interrupt, exiting now", file=sys.stderr)
            os._exit(130)  # the outbox is crash-safe: unacked input is redelivered on restart
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP (systemctl reload) re-reads the file; the Agent validates and applies it between batches.
    signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
    Agent(cfg).run(stop, reload, lambda: config.load(args.config))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT; SIGHUP reloads the config")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=guarded(cmd_run))

    p = sub.add_parser("check-config", help="validate a config file; exit 2 naming the bad field")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=guarded(cmd_check_config))
