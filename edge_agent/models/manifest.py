"""A model directory's manifest: what the daemon checks before it loads a model (standard library only).

A model directory holds the CTranslate2 files, `tokenizer.json` and `manifest.json`. The manifest names the
weights it was built from and the sha256 of every file; `verify` checks it before anything is loaded. This is
the run path's one door into `models/`: building (`build`, `convert`) is never imported by the daemon.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ModelError

MANIFEST = "manifest.json"
KINDS = ("encoder", "generator")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_files(model_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _rebuild_hint(manifest: dict[str, Any]) -> str:
    src = manifest.get("source") or {}
    if tune := manifest.get("finetune"):
        return (f"edge-agent finetune generator --model <{(tune.get('base') or {}).get('name')}> "
                f"--examples {(tune.get('examples') or {}).get('file')} --out DIR")
    if src.get("package"):
        return f"edge-agent models build {manifest.get('name')}"
    return f"edge-agent models build --from-hf {src.get('file') or 'DIR'}"


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{model_dir} is not a model directory: no {MANIFEST}; build one with "
                         "`edge-agent models build NAME`") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelError(f"{path} is not an edge-agent model manifest (no `files` table)")
    if manifest.get("kind") not in KINDS:
        raise ModelError(f"{path}: kind must be one of {KINDS}, got {manifest.get('kind')!r}")
    return manifest


def verify(model_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise ModelError naming the file."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    hint = _rebuild_hint(manifest)
    expected: dict[str, str] = manifest["files"]
    present = set(model_files(model_dir))
    missing = sorted(set(expected) - present)
    if missing:
        raise ModelError(f"model file {missing[0]} is missing from {model_dir}; rebuild with `{hint}`")
    extra = sorted(present - set(expected))
    if extra:
        raise ModelError(f"unexpected file {extra[0]} in model directory {model_dir} (not in its manifest); "
                         f"remove it or rebuild with `{hint}`")
    for name, digest in sorted(expected.items()):
        actual = sha256_file(model_dir / name)
        if actual != digest:
            raise ModelError(f"model file {name} in {model_dir} was modified: sha256 {actual} expected "
                             f"{digest}; rebuild with `{hint}`")
    return manifest


def write_manifest(model_dir: Path, **fields: Any) -> dict[str, Any]:
    """Hash every file in model_dir and write manifest.json: the given fields plus `files`."""
    model_dir = Path(model_dir)
    files = {name: sha256_file(model_dir / name) for name in model_files(model_dir)}
    manifest = {**fields, "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
