"""The task registry: which class a task `kind` is, and building every task the config names.

The registry names its tasks as "module:Class" strings (uvicorn's HTTP_PROTOCOLS shape) and imports one only
when a route uses it, so the registry imports no task and no task imports the registry: the contract they
share is `tasks.base`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import ClassifierTaskConfig, Config, TaggerTaskConfig, TaskConfig
from ..errors import ConfigError, ModelError
from .base import Task, intra_threads

if TYPE_CHECKING:
    from ..models.encoder import Encoder

# kind -> "module:Class". A task class takes (name, config), and (name, config, encoder) for ENCODER_KINDS.
TASKS: dict[str, str] = {
    "patterns": "edge_agent.tasks.patterns:PatternsTask",
    "classifier": "edge_agent.tasks.classifier:ClassifierTask",
    "tagger": "edge_agent.tasks.tagger:TaggerTask",
    "generator": "edge_agent.tasks.generator:GeneratorTask",
    "log_template": "edge_agent.tasks.logtemplate:LogTemplateTask",
}
ENCODER_KINDS = frozenset({"classifier", "tagger"})


class Models:
    """Loads each model directory once; every task that names it shares the loaded model."""

    def __init__(self) -> None:
        self._encoders: dict[tuple[object, ...], Encoder] = {}

    def encoder(self, cfg: ClassifierTaskConfig | TaggerTaskConfig) -> Encoder:
        from ..models.encoder import Encoder  # numpy/ctranslate2 load only when a model task is configured

        threads = intra_threads(cfg.intra_threads)
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


def _build(name: str, tcfg: TaskConfig, models: Models) -> Task:
    module, _, cls = TASKS[tcfg.kind].partition(":")
    task_class = getattr(importlib.import_module(module), cls)
    if tcfg.kind in ENCODER_KINDS:
        assert isinstance(tcfg, ClassifierTaskConfig | TaggerTaskConfig)
        return task_class(name, tcfg, models.encoder(tcfg))
    return task_class(name, tcfg)
