"""The processor interface and the registry that builds tasks from config.

A task takes a batch of notes and returns one JSON-serialisable dict per note, in order. Batching is
part of the contract from the start so that model tasks can run many messages per call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import (
    ClassifierTaskConfig,
    Config,
    GeneratorTaskConfig,
    LogTemplateTaskConfig,
    PatternsTaskConfig,
    TaggerTaskConfig,
)


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


class Models:
    """Loads each model directory once; every task that names it shares the loaded model."""

    def __init__(self) -> None:
        self._encoders: dict[tuple[Any, ...], Any] = {}

    def encoder(self, cfg: Any) -> Any:
        from .encoder import Encoder  # numpy/ctranslate2 load only when a model task is configured

        threads = cfg.intra_threads or min(4, os.cpu_count() or 1)
        key = (cfg.model.resolve(), threads, cfg.inter_threads, cfg.max_length)
        if key not in self._encoders:
            self._encoders[key] = Encoder(
                cfg.model, intra_threads=threads, inter_threads=cfg.inter_threads, max_length=cfg.max_length
            )
        return self._encoders[key]


def build_tasks(cfg: Config) -> dict[str, Task]:
    """Instantiate every task that some route names (built-ins included), once each."""
    names = {name for route in cfg.routes for name in route.tasks}
    models = Models()
    tasks: dict[str, Task] = {}
    for name in sorted(names):
        tcfg = cfg.task(name)
        if isinstance(tcfg, PatternsTaskConfig):
            from .patterns import PatternsTask

            tasks[name] = PatternsTask(name, tcfg)
        elif isinstance(tcfg, ClassifierTaskConfig):
            from .classifier import ClassifierTask

            tasks[name] = ClassifierTask(name, tcfg, models.encoder(tcfg))
        elif isinstance(tcfg, TaggerTaskConfig):
            from .tagger import TaggerTask

            tasks[name] = TaggerTask(name, tcfg, models.encoder(tcfg))
        elif isinstance(tcfg, GeneratorTaskConfig):
            from .generator import GeneratorTask

            tasks[name] = GeneratorTask(name, tcfg)
        elif isinstance(tcfg, LogTemplateTaskConfig):
            from .logtemplate import LogTemplateTask

            tasks[name] = LogTemplateTask(name, tcfg)
        else:  # pragma: no cover - the config model's discriminator makes this unreachable
            raise TypeError(f"no processor for task kind {tcfg.kind!r}")
    return tasks
