"""The processor interface and the registry that builds tasks from config.

A task takes a batch of notes and returns one JSON-serialisable dict per note, in order. Batching is
part of the contract from the start so that model tasks can run many messages per call. A task that can
run long (a model over a 256-note batch can take a minute on 2 cores) calls `heartbeat()` between its
sub-batches, so the systemd watchdog can tell slow from stuck.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
from .errors import ConfigError, ModelError


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


_beat: ContextVar[Callable[[], None] | None] = ContextVar("edge_agent_heartbeat", default=None)


def heartbeat() -> None:
    """Report progress from inside a task's process(); a no-op outside the pipeline (CLI, benchmarks)."""
    beat = _beat.get()
    if beat is not None:
        beat()


@contextmanager
def progress(beat: Callable[[], None]) -> Iterator[None]:
    """Route heartbeat() calls made in this thread (and context) to `beat` while the block runs."""
    token = _beat.set(beat)
    try:
        yield
    finally:
        _beat.reset(token)


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


def build_tasks(cfg: Config, reuse: Mapping[str, Task] | None = None) -> dict[str, Task]:
    """Instantiate every task that some route names (built-ins included), once each.

    A model or head that cannot be loaded is a config error naming the task, so `run` exits 2 with the
    field and the fix, like any other bad setting. `reuse` (hot reload) supplies running tasks whose
    config did not change, so their models are not loaded twice and their state (log templates) stays.
    """
    names = {name for route in cfg.routes for name in route.tasks}
    models = Models()
    tasks: dict[str, Task] = {}
    for name in sorted(names):
        if reuse and name in reuse:
            tasks[name] = reuse[name]
            continue
        try:
            tasks[name] = _build(name, cfg.task(name), models)
        except (ModelError, OSError) as e:
            raise ConfigError(
                f"tasks.{name}",
                str(e),
                "point model/head at a directory built by `edge-agent models build` (or a trained head), "
                "or rebuild it",
            ) from e
    return tasks


def _build(name: str, tcfg: Any, models: Models) -> Task:
    if isinstance(tcfg, PatternsTaskConfig):
        from .patterns import PatternsTask

        return PatternsTask(name, tcfg)
    if isinstance(tcfg, ClassifierTaskConfig):
        from .classifier import ClassifierTask

        return ClassifierTask(name, tcfg, models.encoder(tcfg))
    if isinstance(tcfg, TaggerTaskConfig):
        from .tagger import TaggerTask

        return TaggerTask(name, tcfg, models.encoder(tcfg))
    if isinstance(tcfg, GeneratorTaskConfig):
        from .generator import GeneratorTask

        return GeneratorTask(name, tcfg)
    if isinstance(tcfg, LogTemplateTaskConfig):
        from .logtemplate import LogTemplateTask

        return LogTemplateTask(name, tcfg)
    raise TypeError(f"no processor for task kind {tcfg.kind!r}")  # pragma: no cover - the discriminator
