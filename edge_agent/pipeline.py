"""The processor stage: inbound batch → decode → tasks → results committed → inbound acked.

One worker thread takes up to `batch_max` messages (waiting at most `batch_wait_ms` to fill a batch),
runs each route's tasks over the whole batch at once (model tasks batch across messages), commits all
results and dead-letter records in one outbox transaction, and only then acks the inbound messages.

`last_progress` and `busy` are what the systemd watchdog judges (agent.py): the worker beats when it
takes a batch, when it commits one, between tasks, and whenever a task calls `processors.heartbeat()`
between its own sub-batches, so a slow model batch keeps the watchdog fed and a wedged one starves it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from paho.mqtt.client import topic_matches_sub

from .config import Config, RouteConfig
from .decode import decode_notes
from .errors import DecodeError
from .message import Inbound, Note
from .outbox.store import Outbox, retained
from .progress import progress
from .ratelimit import TokenBucket
from .results import deadletter_payload, result_id, result_payload
from .tasks.base import Task
from .topics import first_asset, output_topic, segments

if TYPE_CHECKING:
    from .metrics import Metrics

log = structlog.get_logger(__name__)

_STOP = object()
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name


@dataclass(slots=True)
class _Pending:
    """One (message, route) pair on its way to the outbox."""

    item: Inbound
    route: RouteConfig
    rid: str
    out_topic: str
    note: Note
    levels: dict[str, str] | None  # named inbound topic levels (UNS), when the route names them


class Pipeline:
    def __init__(self, cfg: Config, tasks: dict[str, Task], outbox: Outbox, inbox: queue.Queue, ack, on_commit,
                 metrics: Metrics | None = None) -> None:
        self._cfg = cfg
        self._limits = cfg.pipeline
        self._tasks = tasks
        self._outbox = outbox
        self._inbox = inbox
        self._ack = ack
        self._on_commit = on_commit
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._batch_lock = threading.Lock()  # held while a batch runs; swap() takes it between batches
        self._buckets = _buckets(cfg)
        self.processed = 0
        self.dead_lettered = 0
        self.over_limit: Counter[str] = Counter()  # route topic -> messages dead-lettered by its rate limit
        self.ignored = 0  # valid payloads that hold no note (a Sparkplug DDATA of measurements only)
        self._metrics = metrics
        self.last_progress = time.monotonic()
        self.busy = False  # between taking a batch and committing it

    def heartbeat(self) -> None:
        self.last_progress = time.monotonic()

    def _routes_for(self, topic: str) -> list[RouteConfig]:
        return [r for r in self._cfg.routes if topic_matches_sub(r.topic, topic)]

    def _take(self) -> list[Inbound] | None:
        """Block for the first message, then gather more for up to batch_wait_ms. None means stop."""
        first = self._inbox.get()
        if first is _STOP or self._stopping.is_set():
            return None
        batch = [first]
        deadline = time.monotonic() + self._limits.batch_wait_ms / 1000
        while len(batch) < self._limits.batch_max:
            try:
                timeout = deadline - time.monotonic()
                nxt = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self._inbox.put(_STOP)  # finish this batch, stop on the next take
                break
            batch.append(nxt)
        return batch

    def process(self, batch: list[Inbound]) -> None:
        gw = self._cfg.gateway_id
        rows: list[tuple[str, str, bytes]] = []
        lines: list[dict] = []
        by_route: dict[int, list[_Pending]] = defaultdict(list)
        routes_in: Counter[str] = Counter()
        reasons: list[str] = []
        for item in batch:
            routes = self._routes_for(item.topic)
            if not routes:  # a leftover subscription from an older config
                routes = [None]
            for route in routes:
                routes_in[route.topic if route is not None else ""] += 1
                try:
                    pendings = self._admit(item, route)
                except DecodeError as e:
                    rows.append(self._dead_letter(item, e.reason, lines))
                    reasons.append(e.reason)
                    continue
                if pendings:
                    by_route[id(route)].extend(pendings)
                else:
                    self.ignored += 1
                    lines.append({"topic": item.topic, "input_id": None, "outcome": "ignored", "t0": item.received_at})

        for pendings in by_route.values():
            route = pendings[0].route
            notes = [p.note for p in pendings]
            outputs: dict[str, list[dict]] = {}
            for name in route.tasks:
                outputs[name] = self._run_task(name, notes)
                self.heartbeat()
            now = time.time()
            for i, p in enumerate(pendings):
                results = {name: outputs[name][i] for name in route.tasks}
                fields = dict(
                    rid=p.rid,
                    input_id=p.note.input_id,
                    topic=p.item.topic,
                    received_at=p.item.received_at,
                    text=p.note.text,
                    processed_at=now,
                    gateway=gw,
                )
                try:
                    payload = result_payload(results=results, **fields)
                except (TypeError, ValueError) as e:  # a task returned NaN or a non-JSON type
                    log.error("task.bad_output", result_id=p.rid, error=str(e))
                    payload = result_payload(results={n: {"error": f"output not JSON: {e}"} for n in results}, **fields)
                topic = p.out_topic
                if route.review_topic and any(r.get("review") for r in results.values() if isinstance(r, dict)):
                    topic = output_topic(route.review_topic, p.item.topic, gw, p.levels)  # low confidence
                rows.append((p.rid, topic, payload))
                if route.retain_latest_topic:
                    rows.extend(self._latest(route.retain_latest_topic, p, results, payload))
                lines.append(
                    {
                        "topic": p.item.topic,
                        "input_id": p.note.input_id,
                        "result_id": p.rid,
                        "outcome": "ok",
                        "t0": p.item.received_at,
                    }
                )

        if rows:
            self._outbox.put_many(rows)  # durable (synchronous=FULL) before any ack leaves
        for item in batch:
            self._ack(item)
        self._on_commit()
        self.processed += len(batch)
        self.heartbeat()
        now = time.time()
        latencies = []
        for line in lines:
            latency = now - line.pop("t0")
            latencies.append(latency)
            log.info("message", latency_ms=round(latency * 1000, 2), **line)
        if self._metrics is not None:
            self._metrics.batch_done(routes_in, reasons, latencies)

    def _latest(self, template: str, p: _Pending, results: dict, payload: bytes) -> list[tuple[str, str, bytes]]:
        """The retained "latest result for this asset" copy (UNS); none when no task found an asset."""
        asset = first_asset(results)
        if asset is None:
            return []
        gw = self._cfg.gateway_id
        topic = output_topic(template, p.item.topic, gw, {**(p.levels or {}), "asset": asset})
        return [(result_id(gw, p.item.topic, topic, p.note.input_id, p.item.payload), retained(topic), payload)]

    def _admit(self, item: Inbound, route: RouteConfig | None) -> list[_Pending]:
        """Check one (message, route) against the route's limits and decode it into its notes: none for a
        valid payload without one (a Sparkplug DDATA of measurements only). DecodeError says why not."""
        if route is None:
            raise DecodeError(f"no route matches topic {item.topic!r}")
        bucket = self._buckets.get(id(route))
        if bucket is not None and not bucket.take(1):
            # Before decode: a runaway publisher costs one dead-letter row each, never model time.
            self.over_limit[route.topic] += 1
            raise DecodeError(f"rate limit: route {route.topic} over {route.rate_limit:g} msg/s")
        decoded = decode_notes(
            item.payload,
            item.topic,
            route,
            max_bytes=route.max_payload_bytes or self._limits.max_payload_bytes,
            max_depth=self._limits.max_json_depth,
        )
        gw = self._cfg.gateway_id
        levels = segments(route.topic_segments, item.topic) if route.topic_segments else None
        out = output_topic(route.output_topic, item.topic, gw, levels)
        longest = max(out, output_topic(route.review_topic or "", item.topic, gw, levels), key=len).encode()
        if len(longest) > MAX_TOPIC_BYTES:  # paho would refuse to publish it, and the row would block the sink
            raise DecodeError(f"output topic too long: {len(longest)} bytes, MQTT allows {MAX_TOPIC_BYTES}")
        return [
            _Pending(item, route, result_id(gw, item.topic, out, input_id, item.payload), out,
                     Note(text=text, topic=item.topic, input_id=input_id, received_at=item.received_at), levels)
            for text, input_id in decoded
        ]

    def _dead_letter(self, item: Inbound, reason: str, lines: list[dict]) -> tuple[str, str, bytes]:
        """The outbox row for a message that cannot be processed, and its log line. Nothing is lost."""
        gw, topic = self._cfg.gateway_id, self._cfg.dead_letter_topic
        rid = result_id(gw, item.topic, topic, None, item.payload)
        payload = deadletter_payload(
            rid=rid, topic=item.topic, received_at=item.received_at, reason=reason, payload=item.payload, gateway=gw
        )
        lines.append(
            {
                "topic": item.topic,
                "input_id": None,
                "result_id": rid,
                "outcome": "deadletter",
                "reason": reason,
                "t0": item.received_at,
            }
        )
        self.dead_lettered += 1
        return rid, topic, payload

    def _run_task(self, name: str, notes: list[Note]) -> list[dict]:
        """A task that fails on a batch yields an error entry per note rather than losing the batch."""
        try:
            t0 = time.perf_counter()
            out = self._tasks[name].process(notes)
            if self._metrics is not None:
                self._metrics.task_done(name, time.perf_counter() - t0, len(notes))
            if len(out) != len(notes):
                raise RuntimeError(f"task returned {len(out)} results for {len(notes)} notes")
            return out
        except Exception as e:
            log.exception("task.failed", task=name, batch=len(notes))
            return [{"error": f"{type(e).__name__}: {e}"} for _ in notes]

    def _run(self) -> None:
        with progress(self.heartbeat):  # tasks' heartbeat() calls on this thread land here
            while (batch := self._take()) is not None:
                self.heartbeat()
                self.busy = True
                try:
                    self._process_until_committed(batch)
                finally:
                    self.busy = False

    def _process_until_committed(self, batch: list[Inbound]) -> None:
        delay = 0.5
        while True:
            try:
                with self._batch_lock:
                    self.process(batch)
                return
            except Exception:
                # Nothing was acked. Retrying the same batch is back-pressure (the broker stops sending
                # at Receive Maximum); on stop the broker redelivers it to our next session. No beat
                # here: a batch that never commits starves the watchdog, and systemd restarts us.
                log.exception("pipeline.batch_failed", size=len(batch), retry_in_s=delay)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 30.0)

    def swap(self, cfg: Config, tasks: dict[str, Task]) -> None:
        """Replace routes, limits and tasks between two batches (hot reload).

        The batch in progress finishes with the old set; the next one, including messages already queued,
        runs with the new set. Nothing is acked twice or skipped: acks follow each batch's commit as ever.
        """
        with self._batch_lock:
            self._cfg, self._limits, self._tasks, self._buckets = cfg, cfg.pipeline, tasks, _buckets(cfg)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Finish what is queued (bounded by timeout). True when the queue drained in time."""
        self._inbox.put(_STOP)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        self._stopping.set()  # past the deadline: abandon a batch stuck in retries
        self._thread.join(1.0)
        return not self._thread.is_alive()


def _buckets(cfg: Config) -> dict[int, TokenBucket]:
    """A token bucket per rate-limited route (a reload starts them full again)."""
    return {id(r): TokenBucket(r.rate_limit, r.burst) for r in cfg.routes if r.rate_limit}
