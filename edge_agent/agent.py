"""The Agent: owns every stage and thread, starts them in order and stops them in reverse.

Start: outbox → sink → tasks (models) → pipeline → source (subscribe last, so nothing arrives before
there is somewhere durable to put it). Stop: stop intake → drain the queue (bounded) → ack → flush the
sink (bounded) → close the outbox. The stop trigger is an injected Event: only the CLI installs signal
handlers, so tests stop an Agent without signals.
"""

from __future__ import annotations

import threading
import time

import structlog

from .config import Config
from .errors import OutboxError
from .notify import Notifier, watchdog_interval
from .outbox import Outbox
from .pipeline import Pipeline
from .processors import Task, build_tasks
from .sink import Sink
from .source import Source

log = structlog.get_logger(__name__)

EXPIRE_EVERY_S = 60.0


class Agent:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.outbox = Outbox(cfg.outbox)
        self.sink: Sink | None = None
        self.source: Source | None = None
        self.pipeline: Pipeline | None = None
        self.tasks: dict[str, Task] = {}

    def start(self) -> None:
        cfg = self.cfg
        self.outbox.open()
        self.sink = Sink(
            cfg.sink, self.outbox, cfg.gateway_id, cfg.sink.client_id or f"edge-agent-{cfg.gateway_id}-sink"
        )
        self.sink.start()
        self.tasks = build_tasks(cfg)
        self.source = Source(cfg.source, cfg.routes, cfg.source.client_id or f"edge-agent-{cfg.gateway_id}-source")
        self.pipeline = Pipeline(cfg, self.tasks, self.outbox, self.source.queue, self.source.ack, self.sink.wake)
        self.pipeline.start()
        self.source.start()
        log.info(
            "agent.started",
            gateway=cfg.gateway_id,
            routes=[r.topic for r in cfg.routes],
            tasks=sorted(self.tasks),
            outbox=str(cfg.outbox.path),
        )

    def run(self, stop: threading.Event) -> None:
        """Start, serve until `stop` is set, then stop in order."""
        self.start()
        try:
            self.notifier.ready(status="running")
            self._serve(stop)
        finally:
            self.notifier.stopping()
            self.stop()

    def _serve(self, stop: threading.Event) -> None:
        ping = watchdog_interval()
        tick = min(ping or 1.0, 1.0)
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        while not stop.wait(tick):
            if ping is not None and self._healthy(ping):
                self.notifier.watchdog()
            if time.monotonic() >= next_expire:
                try:
                    self.outbox.expire()
                except OutboxError as e:  # a full disk: retried next time, never a reason to exit
                    log.error("outbox.expire_failed", error=str(e), retry_in_s=EXPIRE_EVERY_S)
                next_expire = time.monotonic() + EXPIRE_EVERY_S

    def _healthy(self, ping: float) -> bool:
        """The pipeline is alive: it made progress recently, or has nothing to do."""
        assert self.pipeline is not None and self.source is not None
        idle = self.source.queue.empty()
        return idle or time.monotonic() - self.pipeline.last_progress < 2 * ping

    def stop(self) -> None:
        timeout = self.cfg.pipeline.drain_timeout_s
        if self.source is not None:
            self.source.stop_intake()
        if self.pipeline is not None and not self.pipeline.stop(timeout):
            log.warning("agent.drain_timeout", timeout_s=timeout, hint="unacked messages are redelivered on restart")
        if self.source is not None:
            self.source.close()
        if self.sink is not None:
            self.sink.flush(timeout)
            self.sink.close()
        for task in self.tasks.values():
            task.close()
        stats = self.outbox.stats()
        self.outbox.close()
        log.info("agent.stopped", outbox_rows=stats.count, outbox_bytes=stats.bytes)
