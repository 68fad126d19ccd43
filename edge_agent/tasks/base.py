"""The contract every task implements, below both the registry and the tasks (so nothing imports in a circle).

A task takes a batch of notes and returns one JSON-serialisable dict per note, in order. Batching is
part of the contract from the start so that model tasks can run many messages per call. A task that can
run long calls `edge_agent.progress.heartbeat()` between its sub-batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from ..message import Note


class Task(Protocol):
    name: str

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        """Return one JSON-serialisable dict per note, same order. Must not raise for odd text."""
        ...

    def close(self) -> None: ...


def intra_threads(configured: int) -> int:
    """CTranslate2 threads per batch for a model task: the configured number, or 0 = min(4, CPU cores)."""
    return configured or min(4, os.cpu_count() or 1)
