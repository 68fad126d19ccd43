"""The `predict` commands' shared stream: JSONL `{"text"}` on stdin, one JSON line per input line on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

BAD_LINE = 'expected a JSON object with a string "text"'


def predict_lines(lines: Iterable[str], batch_size: int, run: Callable[[list[str]], Iterable[dict[str, Any]]],
                  *, skip_blank: bool = False) -> None:
    """Write, for each input line in order, `run`'s result for its text or `{"error"}` for a line that is not a
    JSON object with a string "text". Texts reach `run` in batches of `batch_size` lines; each batch is
    flushed as it is done. `skip_blank` drops empty lines instead of answering them with an error."""
    batch: list[str | dict[str, Any]] = []  # a text, or the error line for a bad input line

    def flush() -> None:
        results = iter(run([x for x in batch if isinstance(x, str)]))
        for item in batch:
            sys.stdout.write(json.dumps(next(results) if isinstance(item, str) else item, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        batch.clear()

    for line in lines:
        if skip_blank and not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(BAD_LINE)
            batch.append(row["text"])
        except ValueError as e:
            batch.append({"error": str(e)})
        if len(batch) >= batch_size:
            flush()
    flush()
