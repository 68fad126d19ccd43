"""The Agent: owns every stage and thread, starts them in order and stops them in reverse.

Start: outbox → sink → tasks (models) → pipeline → source (subscribe last, so nothing arrives before
there is somewhere durable to put it). Each stage's stop is pushed onto an ExitStack as the stage starts, so
stop is start reversed — stop intake → drain the queue (bounded), acking → close the source → close the tasks
→ flush the sink (bounded) → close the outbox → release its lock — and a start that fails halfway unwinds
what it had started. The stop trigger is an injected Event: only the CLI installs signal
handlers, so tests stop an Agent without signals. The reload trigger is another Event (SIGHUP in the CLI).

systemd (Type=notify): READY=1 once the outbox is open, the models are loaded and the source broker has
granted our subscriptions, i.e. once intake works. The uplink is not waited for: store-and-forward
means results queue in the outbox while it is down, which is the normal state of a gateway at the edge.
WATCHDOG=1 is sent only while the pipeline makes progress (see `_healthy`).

Hot reload: the new config is validated and its tasks built (model tasks always, others when changed) on a
reload thread while the old pipeline keeps serving; then subscriptions that no route keeps are dropped,
routes and tasks are swapped between two batches, new filters are subscribed, and replaced tasks are closed.
A field that cannot change live (RESTART_ONLY) keeps its running value and is logged `reload.needs_restart`;
the rest applies. An invalid config is rejected whole, logged with field and fix, and the running config stays.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import structlog
from pydantic import BaseModel

from .config import ClassifierTaskConfig, Config
from .digest import Digester
from .digest import dumps as digest_dumps
from .errors import ConfigError, OutboxError
from .metrics import Metrics
from .mqtt.client import preflight
from .mqtt.sink import Sink
from .mqtt.source import Source
from .notify import Notifier, watchdog_interval
from .outbox.lock import OutboxLock
from .outbox.store import Outbox
from .pipeline import Pipeline
from .tasks.base import Task
from .tasks.registry import build_tasks

if TYPE_CHECKING:
    from .learn import Learner

log = structlog.get_logger(__name__)

EXPIRE_EVERY_S = 60.0
SUBSCRIBED_KEY = "source.subscriptions"  # in the outbox file: what our persistent session may hold
DIGEST_KEY = "digest.last_end"  # in the outbox file: the end of the last window digested
MAX_MISSED_DIGESTS = 6  # after a long outage, the latest windows only (two days of three shifts)
FILE_CHECK_EVERY_S = 5.0  # how soon an outbox deleted under the daemon is noticed and recreated
# Settings held by open connections, files and client ids: a reload keeps their running values.
RESTART_ONLY = ("gateway_id", "source", "sink", "outbox", "log", "metrics", "digest", "feedback")


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
        self._reloader: threading.Thread | None = None
        self._started: ExitStack | None = None  # the stops of what start() started, run by stop()
        self._drained = True  # False when stop's drain left a batch running inside a task
        self.digester: Digester | None = None
        self.learners: dict[str, Learner] = {}  # task name -> on-gateway retraining (learn = true)

    def start(self) -> None:
        """Start every stage in order, pushing each one's stop as it starts: stopping is starting reversed,
        and a start that fails halfway (a model that does not load) unwinds what it had started."""
        cfg = self.cfg
        with ExitStack() as stack:
            preflight(cfg)  # passwords and TLS files: a bad path fails here, before anything starts
            self.outbox_lock.acquire()  # one daemon per outbox; `edge-agent outbox purge` checks it too
            stack.callback(self.outbox_lock.release)
            self.outbox.open()
            stack.callback(self._close_outbox)
            # Members of a share group run under one gateway id: the default sink id follows the member's own.
            member = f"{cfg.source.client_id}-" if cfg.source.share_group else f"edge-agent-{cfg.gateway_id}-"
            self.sink = Sink(cfg.sink, self.outbox, cfg.gateway_id, cfg.sink.client_id or f"{member}sink",
                             dead_letter_topic=cfg.dead_letter_topic)
            self.sink.start()
            stack.callback(self._close_sink)
            self.tasks = build_tasks(cfg)
            stack.callback(self._close_tasks)
            before = json.loads(self.outbox.get_meta(SUBSCRIBED_KEY) or "[]")
            requests = [t for t in (cfg.digest_request_topic, cfg.feedback_topic) if t]
            self.source = Source(cfg.source, cfg.routes, cfg.source.client_id or f"edge-agent-{cfg.gateway_id}-source",
                                 subscribed_before=before, extra_filters=requests,
                                 remember=lambda subs: self.outbox.set_meta(SUBSCRIBED_KEY, json.dumps(subs)))
            stack.callback(self.source.close)  # after the drain below: the pipeline acks through the source
            self.digester = Digester(cfg.digest, cfg.gateway_id) if cfg.digest.enabled else None
            self.learners = self._learners(cfg, self.tasks)
            self.pipeline = Pipeline(cfg, self.tasks, self.outbox, self.source.queue, self.source.ack, self.sink.wake,
                                     metrics=self.metrics, digester=self.digester, learners=self.learners)
            if self.metrics is not None:
                self.metrics.loaded(self.tasks)
                self.metrics.watch(self.outbox, self.source, self.sink)
                self.metrics.watch_learning(self)
                stack.callback(self.metrics.close)
                self.metrics.serve(cfg.metrics)
            self.pipeline.start()
            stack.callback(self._drain)
            self.source.start()
            stack.callback(self.source.stop_intake)
            self._started = stack.pop_all()
        log.info(
            "agent.started",
            gateway=cfg.gateway_id,
            routes=[r.topic for r in cfg.routes],
            tasks=sorted(self.tasks),
            outbox=str(cfg.outbox.path),
        )

    def run(
        self,
        stop: threading.Event,
        reload: threading.Event | None = None,
        load: Callable[[], Config] | None = None,
    ) -> None:
        """Start, serve until `stop` is set, then stop in order. Each time `reload` is set, apply `load()`."""
        self.start()
        try:
            self._serve(stop, reload, load)
        finally:
            self.notifier.stopping()
            self.stop()

    def _serve(self, stop: threading.Event, reload: threading.Event | None, load: Callable[[], Config] | None) -> None:
        assert self.source is not None
        ping = watchdog_interval()
        tick = min(ping or 1.0, 1.0)
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        next_file_check = time.monotonic() + FILE_CHECK_EVERY_S
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
            if self.digester is not None:
                self._publish_due_digests()
            if time.monotonic() >= next_expire:
                try:
                    if self.cfg.keep_results_s:
                        self.outbox.trim_recent(time.time() - self.cfg.keep_results_s)
                    self.outbox.expire()
                except OutboxError as e:  # a full disk: retried next time, never a reason to exit
                    log.error("outbox.expire_failed", error=str(e), retry_in_s=EXPIRE_EVERY_S)
                next_expire = time.monotonic() + EXPIRE_EVERY_S
            if time.monotonic() >= next_file_check:
                self._check_files()
                next_file_check = time.monotonic() + FILE_CHECK_EVERY_S
            # A SIGHUP before READY waits for it: systemd's RELOADING=1 ... READY=1 brackets a running service.
            if ready and reload is not None and load is not None and reload.is_set() and not self._reloading():
                reload.clear()  # a signal during this reload starts another one after it
                self._reloader = threading.Thread(target=self.reload, args=(load,), name="edge-agent-reload")
                self._reloader.start()

    def _learners(self, cfg: Config, tasks: dict[str, Task]) -> dict[str, Learner]:
        """One Learner per classifier task with learn = true, its last learned head restored."""
        out = {}
        for name, task in tasks.items():
            tcfg = cfg.tasks.get(name)
            if isinstance(tcfg, ClassifierTaskConfig) and tcfg.learn:
                from .learn import Learner, heads_dir  # numpy and the head fitting load only for such a task

                learner = Learner(name, task, tcfg, self.outbox, heads_dir(cfg.outbox.path))  # type: ignore[arg-type]
                learner.restore()
                out[name] = learner
        return out

    def _publish_due_digests(self) -> None:
        """Each shift end passed since the last digest gets its digest, once: also those that fell due while
        the daemon was down (the window end is committed with the digest, in one transaction)."""
        assert self.digester is not None and self.sink is not None
        now = time.time()
        last = self.outbox.get_meta(DIGEST_KEY)
        if last is None:  # the first start with digests on: no window before it
            ends = self.digester.shift_ends(now - 2 * 24 * 3600, now)
            self.outbox.set_meta(DIGEST_KEY, repr(ends[-1] if ends else now))
            return
        due = self.digester.shift_ends(float(last), now)[-MAX_MISSED_DIGESTS:]
        for end in due:
            start = max(float(last), self.digester.previous_end(end))
            try:
                digest = self.digester.build(self.outbox.recent_between(start, end), start, end)
                self.outbox.put_many([(digest["id"], self.cfg.digest_topic, digest_dumps(digest))],
                                     meta={DIGEST_KEY: repr(end)})
            except (OutboxError, ValueError) as e:  # a full disk: tried again at the next tick
                log.error("digest.failed", window_end=end, error=str(e))
                return
            last = repr(end)
            log.info("digest.published", id=digest["id"], notes=digest["notes"], items=len(digest["items"]),
                     ungrounded_dropped=digest["ungrounded_dropped"], window_from=digest["from"],
                     window_to=digest["to"])
            self.sink.wake()

    def _check_files(self) -> None:
        """The outbox file and its lock still exist under their names; recreated (rows kept) when not."""
        try:
            self.outbox.check_file()
            if not self.outbox_lock.check():
                log.error("outbox.lock_recreated", path=str(self.outbox_lock.path),
                          hint="the lock file was deleted while the daemon ran; it holds a new one")
        except (OutboxError, ConfigError) as e:  # retried next time; never a reason to exit
            log.error("outbox.check_failed", error=str(e), retry_in_s=FILE_CHECK_EVERY_S)

    def _reloading(self) -> bool:
        return self._reloader is not None and self._reloader.is_alive()

    def reload(self, load: Callable[[], Config]) -> bool:
        """Apply a new config to the running agent (see the module docstring). True when applied."""
        self.notifier.reloading()
        status = "running"
        try:
            new = load()
            kept = _restart_only_changes(self.cfg, new)
            for field in kept:
                log.warning("reload.needs_restart", field=field, hint="restart edge-agent to change it; kept as is")
            self._apply(new.model_copy(update={name: getattr(self.cfg, name) for name in RESTART_ONLY}), kept)
            return True
        except ConfigError as e:
            log.error("reload.rejected", field=e.field, error=e.message, fix=e.hint, kept="the running config")
            status = f"running; last reload rejected: {e.field}"
        except Exception as e:  # never let a reload take the daemon down
            log.exception("reload.failed", error=str(e), kept="the running config")
            status = "running; last reload failed"
        finally:
            self.notifier.ready(status=status)
        return False

    def _apply(self, new: Config, kept: list[str]) -> None:
        assert self.pipeline is not None and self.source is not None
        old = self.cfg
        same = {n: t for n, t in self.tasks.items() if _reusable(old, new, n)}
        tasks = build_tasks(new, reuse=same)  # models load here, while the old pipeline keeps serving
        unsubscribed = self.source.unsubscribe_removed(new.routes)
        learners = self._learners(new, tasks)
        self.pipeline.swap(new, tasks, learners)
        self.learners = learners
        retired, self.tasks, self.cfg = self.tasks, tasks, new
        subscribed = self.source.subscribe_added(new.routes)
        for name, task in retired.items():
            if tasks.get(name) is not task:
                task.close()
        if self.metrics is not None:
            self.metrics.loaded(tasks)
        log.info(
            "reload.applied",
            routes=[r.topic for r in new.routes],
            tasks=sorted(tasks),
            rebuilt=sorted(n for n in tasks if n not in same),
            subscribed=subscribed,
            unsubscribed=unsubscribed,
            needs_restart=kept,
        )

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
        """Stop intake → drain the queue (bounded) → close the source → close the tasks → flush the sink
        (bounded) → close the outbox → release its lock: start() in reverse."""
        if self._reloader is not None:
            self._reloader.join()  # a reload half-applied while stopping would close tasks twice
        started, self._started = self._started, None
        if started is not None:
            started.close()

    def _drain(self) -> None:
        assert self.pipeline is not None
        timeout = self.cfg.pipeline.drain_timeout_s
        self._drained = self.pipeline.stop(timeout)
        if not self._drained:
            log.warning("agent.drain_timeout", timeout_s=timeout, hint="unacked messages are redelivered on restart")

    def _close_tasks(self) -> None:
        if not self._drained:  # never close a model under the batch still running in it (abandoned, uncommitted)
            log.warning("agent.tasks_left_open", hint="a batch abandoned at stop is still inside a task")
            return
        for task in self.tasks.values():
            task.close()

    def _close_sink(self) -> None:
        assert self.sink is not None
        self.sink.flush(self.cfg.pipeline.drain_timeout_s)
        self.sink.close()

    def _close_outbox(self) -> None:
        stats = self.outbox.stats()
        self.outbox.close()
        log.info("agent.stopped", outbox_rows=stats.count, outbox_bytes=stats.bytes)


def _reusable(old: Config, new: Config, name: str) -> bool:
    """An unchanged task without model files is kept (log templates keep what they learned); a model task is
    always rebuilt, so a head retrained or a model rebuilt at the same path is picked up."""
    try:
        tcfg = new.task(name)
    except KeyError:
        return False
    return tcfg == old.task(name) and not hasattr(tcfg, "model")


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Dotted names of RESTART_ONLY settings that differ (`sink.port`, `gateway_id`)."""
    return [field for name in RESTART_ONLY for field in _diff(name, getattr(old, name), getattr(new, name))]


def _diff(path: str, a: object, b: object) -> Iterator[str]:
    if a == b:
        return
    if isinstance(a, BaseModel) and type(a) is type(b):
        for key in type(a).model_fields:
            yield from _diff(f"{path}.{key}", getattr(a, key), getattr(b, key))
    else:
        yield path
