"""Example files: JSONL, one JSON object a line. The one reader of them; each trainer checks its own fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_jsonl(path: Path | str) -> list[tuple[int, Any]]:
    """(line number, JSON value) for each non-blank line; a line that is not JSON is an InputError naming the
    file and the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except ValueError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
    return rows
