"""What the tests share: harness pieces that more than one test module needs.

First piece: `Running`, the Agent on a thread (in-process), started against a config file and stopped through
its injected stop event. (Broker, free_port, wait_for, publisher/collector and write_config still live in
tests/conftest.py.)
"""

from __future__ import annotations

import threading
from pathlib import Path

from edge_agent import config
from edge_agent.agent import Agent

from ..conftest import wait_for


class Running:
    def __init__(self, cfg_path: Path) -> None:
        self.agent = Agent(config.load(cfg_path, environ={}))
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.agent.source is not None and self.agent.source.connected.is_set(), 15)

    def _run(self) -> None:
        try:
            self.agent.run(self.stop_event)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
