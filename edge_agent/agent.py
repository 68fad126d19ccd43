"""The Agent: owns every stage and thread, starts them in order and stops them in reverse.

Start: outbox → sink → tasks (models) → pipeline → source (subscribe last, so nothing arrives before
there is somewhere durable to put it). Stop: stop intake → drain the queue (bounded) → ack → flush the
sink (bounded) → close the outbox. The stop trigger is an injected Event: only the CLI installs signal
handlers, so tests stop an Agent without signals.

systemd (Type=notify): READY=1 once the outbox is open, the models are loaded and the source broker has
granted our subscriptions, i.e. once intake works. The uplink is not waited for: store-and-forward
means results queue in the outbox while it is down, which is the normal state of a gateway at the edge.
WATCHDOG=1 is sent only while the pipeline makes progress (see `_healthy`).
"""

from __future__ import annotations

import threading
import time

import structlog

from .config import Config
from .metrics import Metrics
from .notify import Notifier, watchdog_interval
from .outbox import Outbox, OutboxLock
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
        self.outbox_lock = OutboxLock(cfg.outbox.path)
        self.metrics = Metrics() if cfg.metrics.enabled else None
        self.sink: Sink | None = None
        self.source: Source | None = None
        self.pipeline: Pipeline | None = None
        self.tasks: dict[str, Task] = {}

    def start(self) -> None:
        cfg = self.cfg
        self.outbox_lock.acquire()  # one daemon per outbox; `edge-agent outbox purge` checks it too
        self.outbox.open()
        # Members of a share group run under one gateway id: the default sink id follows the member's own.
        member = f"{cfg.source.client_id}-" if cfg.source.share_group else f"edge-agent-{cfg.gateway_id}-"
        self.sink = Sink(cfg.sink, self.outbox, cfg.gateway_id, cfg.sink.client_id or f"{member}sink")
        self.sink.start()
        self.tasks = build_tasks(cfg)
        self.source = Source(cfg.source, cfg.routes, cfg.source.client_id or f"edge-agent-{cfg.gateway_id}-source")
        self.pipeline = Pipeline(cfg, self.tasks, self.outbox, self.source.queue, self.source.ack, self.sink.wake,
                                 metrics=self.metrics)
        if self.metrics is not None:
            self.metrics.loaded(self.tasks)
            self.metrics.watch(self.outbox, self.source, self.sink)
            self.metrics.serve(cfg.metrics)
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
            self._serve(stop)
        finally:
            self.notifier.stopping()
            self.stop()

    def _serve(self, stop: threading.Event) -> None:
        assert self.source is not None
        ping = watchdog_interval()
        tick = min(ping or 1.0, 1.0)
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        ready = False
        if not self.source.subscribed.is_set():
            where = f"{self.cfg.source.host}:{self.cfg.source.port}"
            self.notifier.status(f"waiting for the source broker at {where}")
        while not stop.is_set():
            if ready:
                stop.wait(tick)
            else:
                ready = self._announce_ready(tick)
            if ping is not None and self._healthy(ping):
                self.notifier.watchdog()
            if time.monotonic() >= next_expire:
                self.outbox.expire()
                next_expire = time.monotonic() + EXPIRE_EVERY_S

    def _announce_ready(self, wait: float) -> bool:
        """READY=1 once the source has subscribed (waiting at most `wait`). The watchdog is fed meanwhile:
        a source broker that is down at boot is TimeoutStartSec's business, not the watchdog's."""
        assert self.source is not None
        if not self.source.subscribed.wait(wait):
            return False
        self.notifier.ready(status="running")
        return True

    def _healthy(self, ping: float) -> bool:
        """The pipeline is alive: it made progress within the watchdog period (a task's heartbeat counts),
        or it is idle. Busy with an empty queue is not idle: that is a batch being processed, maybe stuck."""
        assert self.pipeline is not None and self.source is not None
        idle = not self.pipeline.busy and self.source.queue.empty()
        return idle or time.monotonic() - self.pipeline.last_progress < 2 * ping

    def stop(self) -> None:
        timeout = self.cfg.pipeline.drain_timeout_s
        if self.metrics is not None:
            self.metrics.close()
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
        self.outbox_lock.release()
        log.info("agent.stopped", outbox_rows=stats.count, outbox_bytes=stats.bytes)
