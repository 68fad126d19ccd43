"""Examples for a classifier head (`edge-agent classifier train`, in `cli.classifier`): `{"text", "label"}`
rows. The fitting itself is `tasks.fit.train` (numpy), which a task that learns on the gateway runs too."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..tasks.classifier import _clean
from .examples import read_jsonl


def read_examples(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for n, row in read_jsonl(path):
        try:
            text, label = row["text"], row["label"]
            if not isinstance(text, str) or not isinstance(label, str) or not label:
                raise TypeError("text and label must be strings")
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: expected {{\"text\": str, \"label\": str}} ({e})") from None
        texts.append(_clean(text))
        labels.append(label)
    return texts, labels
