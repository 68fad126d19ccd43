"""Agent.start: each stage's stop is pushed as it starts, so a start that fails halfway leaves nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.errors import ConfigError, OutboxError
from edge_agent.outbox.lock import OutboxLock

from .kit import wait_for
from .kit.config import write_config


def test_a_start_that_fails_at_the_models_leaves_nothing_behind(tmp_path: Path, broker) -> None:
    """The outbox is open, its lock held and the sink connected (paho's thread and ours) when a model task fails
    to load: all of it is undone before the error reaches the caller, and the next start works."""
    outbox = tmp_path / "o.db"
    cfg_args = dict(source_port=broker.port, sink_port=broker.port, outbox=outbox)
    tasks = {"category": {"kind": "classifier", "model": tmp_path / "no-such-model",
                          "labels": {"leak": "fluid leaking", "noise": "abnormal noise"}}}
    cfg_path = write_config(tmp_path / "c.toml", **cfg_args, tasks=tasks,
                            routes=[{"topic": "plant/+/notes", "tasks": ["patterns", "category"]}])
    before = set(threading.enumerate())
    agent = Agent(config.load(cfg_path, environ={}))
    with pytest.raises(ConfigError) as failed:
        agent.start()
    assert failed.value.field == "tasks.category"
    assert agent.sink is not None  # it got as far as starting the sink
    assert wait_for(lambda: set(threading.enumerate()) <= before, 10), sorted(
        t.name for t in set(threading.enumerate()) - before)
    with pytest.raises(OutboxError, match="not open"):
        agent.outbox.stats()
    with OutboxLock(outbox):  # released: another daemon (or `edge-agent outbox purge`) may take it
        pass
    agent.stop()  # harmless after a failed start

    write_config(cfg_path, **cfg_args, tasks=tasks, routes=[{"topic": "plant/+/notes", "tasks": ["patterns"]}])
    again = Agent(config.load(cfg_path, environ={}))
    again.start()
    try:
        assert wait_for(lambda: again.source is not None and again.source.subscribed.is_set(), 15)
    finally:
        again.stop()
    assert wait_for(lambda: set(threading.enumerate()) <= before, 10)
