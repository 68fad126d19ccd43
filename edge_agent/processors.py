"""The processor interface and the registry that builds tasks from config.

A task takes a batch of notes and returns one JSON-serialisable dict per note, in order. Batching is
part of the contract from the start so that model tasks can run many messages per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import Config, PatternsTaskConfig


@dataclass(frozen=True, slots=True)
class Note:
    """One decoded inbound message, ready for the tasks."""

    text: str
    topic: str
    input_id: str | None = None
    received_at: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        """Return one JSON-serialisable dict per note, same order. Must not raise for odd text."""
        ...

    def close(self) -> None: ...


def build_tasks(cfg: Config) -> dict[str, Task]:
    """Instantiate every task that some route names (built-ins included), once each."""
    from .patterns import PatternsTask  # imported here so the registry stays the one place tasks are made

    names = {name for route in cfg.routes for name in route.tasks}
    tasks: dict[str, Task] = {}
    for name in sorted(names):
        tcfg = cfg.task(name)
        if isinstance(tcfg, PatternsTaskConfig):
            tasks[name] = PatternsTask(name, tcfg)
        else:  # pragma: no cover - the config model's discriminator makes this unreachable
            raise TypeError(f"no processor for task kind {tcfg.kind!r}")
    return tasks
