"""The processor stage: inbound batch → decode → tasks → results committed → inbound acked.

One worker thread takes up to `batch_max` messages (waiting at most `batch_wait_ms` to fill a batch),
runs each route's tasks over the whole batch at once (model tasks batch across messages), commits all
results and dead-letter records in one outbox transaction, and only then acks the inbound messages.

One message can never fail its batch. Whatever one message raises while it is routed, decoded, run
through the tasks or serialised turns that message into a dead letter (its kind, the exception class and
a short message) and the rest of the batch goes on and commits: otherwise the broker would redeliver the
same poison message after every restart and nothing behind it would ever be processed. A task that raises
on a batch is run again note by note, so only the note that makes it fail is dead-lettered. Only what is
not one message's fault (the outbox cannot commit: a full disk) fails the batch, which is then retried.

A batch still running when stop's drain deadline passes is abandoned: nothing of it is committed or
acked (its inputs are redelivered to our next session), and no task is closed under it, so a result made
of a shutdown error can never be published under a real result id.

`last_progress` and `busy` are what the systemd watchdog judges (agent.py): the worker beats when it
takes a batch, when it commits one, between tasks, and whenever a task calls `processors.heartbeat()`
between its own sub-batches, so a slow model batch keeps the watchdog fed and a wedged one starves it.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog
from paho.mqtt.client import topic_matches_sub

from . import feedback
from .config import Config, RouteConfig
from .decode import decode_notes
from .digest import Digester
from .digest import dumps as digest_dumps
from .errors import DeadLetterKind, DecodeError
from .message import Inbound, Note
from .outbox.store import Outbox, retained
from .progress import progress
from .ratelimit import TokenBucket
from .results import deadletter_payload, instant, result_id, result_payload
from .tasks.base import Task
from .topics import first_asset, output_topic, segments

if TYPE_CHECKING:
    from .learn import Learner
    from .metrics import Metrics

log = structlog.get_logger(__name__)

_STOP = object()
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name
MAX_REASON_CHARS = 300  # an exception's message in a dead-letter reason (it may quote the whole note)

Ack = Callable[[Inbound], None]  # acknowledge one inbound message to its broker (after the commit)
Row = tuple[str, str, bytes]  # (result id, outbox topic, payload): what the outbox stores


@dataclass(slots=True)
class _Pending:
    """One (message, route, note) on its way to the outbox."""

    item: Inbound
    route: RouteConfig
    rid: str
    out_topic: str
    note: Note
    levels: dict[str, str] | None  # named inbound topic levels (UNS), when the route names them


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one (message, route) or note: the canonical log line, and what metrics count."""

    topic: str
    received_at: float
    outcome: Literal["ok", "deadletter", "ignored"]
    route: str  # the route's topic filter; "" when no route matched
    input_id: str | None = None
    result_id: str | None = None
    kind: DeadLetterKind | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Failed:
    """A task's output for a note on which the task raised even when run alone."""

    kind: DeadLetterKind
    reason: str


@dataclass(slots=True)
class _Made:
    """What one batch has made so far: rows to commit, and what became of each message."""

    rows: list[Row] = field(default_factory=list)  # results
    dead: list[Row] = field(default_factory=list)  # dead letters: their own bound in the outbox
    recent: list[tuple[str, float, bytes]] = field(default_factory=list)  # results kept for the digest
    corrected: list[tuple[feedback.Correction, Inbound]] = field(default_factory=list)  # and where each came from
    outcomes: list[Outcome] = field(default_factory=list)
    routes_in: Counter[str] = field(default_factory=Counter)  # (message, route) pairs taken, per route filter


class _Abandoned(Exception):
    """The batch was cut short by stop: nothing of it may be committed or acked."""


def describe(e: BaseException) -> str:
    """`ExceptionClass: message`, short, and publishable (lone surrogates from a note's text escaped)."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Pipeline:
    def __init__(self, cfg: Config, tasks: dict[str, Task], outbox: Outbox, inbox: queue.Queue, ack: Ack,
                 on_commit: Callable[[], None], metrics: Metrics | None = None,
                 digester: Digester | None = None, learners: Mapping[str, Learner] | None = None) -> None:
        self._cfg = cfg
        self._learners = dict(learners or {})  # task name -> its on-gateway retraining (learn = true)
        self._digester = digester  # results are kept for it, and digest requests answered, when configured
        self._limits = cfg.pipeline
        self._tasks = tasks
        self._outbox = outbox
        self._inbox = inbox
        self._ack = ack
        self._on_commit = on_commit  # wakes the sink
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # set past stop's drain deadline: abandon the batch in progress
        self._batch_lock = threading.Lock()  # held while a batch runs; swap() takes it between batches
        self._commit_lock = threading.Lock()  # held while a batch commits and acks; stop() sets _stopping in it
        self._buckets = _buckets(cfg)
        self._special = self._special_topics(cfg)
        self.processed = 0
        self.dead_lettered = 0
        self.over_limit: Counter[str] = Counter()  # route topic -> messages dead-lettered by its rate limit
        self.ignored = 0  # valid payloads that hold no note (a Sparkplug DDATA of measurements only)
        self.corrections: Counter[str] = Counter()  # task -> corrections accepted
        self._metrics = metrics
        self.last_progress = time.monotonic()
        self.busy = False  # between taking a batch and committing it

    def heartbeat(self) -> None:
        self.last_progress = time.monotonic()

    def _task_beat(self) -> None:
        """heartbeat() from inside a task: also where a long model batch learns that it is abandoned."""
        if self._stopping.is_set():
            raise _Abandoned
        self.heartbeat()

    def _routes_for(self, topic: str) -> list[RouteConfig]:
        return [r for r in self._cfg.routes if topic_matches_sub(r.topic, topic)]

    def _take(self) -> list[Inbound] | None:
        """Block for the first message, then gather more for up to batch_wait_ms. None means stop."""
        first = self._inbox.get()
        if first is _STOP or self._stopping.is_set():
            return None
        batch = [first]
        size = len(first.payload)
        deadline = time.monotonic() + self._limits.batch_wait_ms / 1000
        while len(batch) < self._limits.batch_max and size < self._limits.batch_max_bytes:
            try:
                timeout = deadline - time.monotonic()
                nxt = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self._inbox.put(_STOP)  # finish this batch, stop on the next take
                break
            batch.append(nxt)
            size += len(nxt.payload)
        return batch

    # -- one batch: admit → run the routes' tasks → commit → ack → report ------------------------------
    def process(self, batch: list[Inbound]) -> None:
        made = _Made()
        by_route: dict[int, list[_Pending]] = defaultdict(list)
        for item in batch:
            for route, pendings in self._admit_message(item, made):
                by_route[id(route)].extend(pendings)
        for pendings in by_route.values():
            self._run_route(pendings, made)
        self._commit(batch, made)
        # Committed and acked from here on: nothing below may fail the batch (it would be processed again).
        try:
            self._learn(made)
        except Exception:
            log.exception("learn.failed", kept="the live heads")
        try:
            self._report(made)
        except Exception:
            log.exception("pipeline.report_failed", size=len(batch))

    def _admit_message(self, item: Inbound, made: _Made) -> Iterator[tuple[RouteConfig, list[_Pending]]]:
        """(route, pendings) for each route of one message; its dead letters and "ignored" go to `made`."""
        special = self._special.get(item.topic)
        if special is not None:  # a digest request or a correction, not a note
            made.routes_in[item.topic] += 1
            special(item, made)
            return
        try:
            routes: list[RouteConfig | None] = list(self._routes_for(item.topic)) or [None]
        except Exception as e:  # a topic the matcher chokes on: still this message's problem only
            log.exception("pipeline.message_failed", topic=item.topic, stage="route")
            made.routes_in[""] += 1
            self._dead_letter(made, item, None, DeadLetterKind.INTERNAL, describe(e))
            return
        for route in routes:
            made.routes_in[route.topic if route is not None else ""] += 1
            try:
                pendings = self._admit(item, route)
            except DecodeError as e:
                self._dead_letter(made, item, route, e.kind, e.reason)
                continue
            except Exception as e:
                log.exception("pipeline.message_failed", topic=item.topic, stage="decode")
                self._dead_letter(made, item, route, DeadLetterKind.INTERNAL, describe(e))
                continue
            if pendings:
                yield route, pendings
            else:
                self.ignored += 1
                made.outcomes.append(Outcome(item.topic, item.received_at, "ignored", route.topic if route else ""))

    def _run_route(self, pendings: list[_Pending], made: _Made) -> None:
        """Run a route's tasks over its notes, in order; a note a task fails on leaves the route as a dead
        letter (the tasks after it do not see it). Then one result row (or rows, UNS) per note."""
        route = pendings[0].route
        results: list[dict[str, Any]] = [{} for _ in pendings]
        live = list(range(len(pendings)))
        for name in route.tasks:
            if not live:
                break
            out = self._run_task(name, [pendings[i].note for i in live])
            self._check_stop()
            kept = []
            for i, value in zip(live, out, strict=True):
                if isinstance(value, _Failed):
                    p = pendings[i]
                    self._dead_letter(made, p.item, route, value.kind, value.reason, p.note.input_id)
                else:
                    results[i][name] = _bounded(value, self._limits.max_items)
                    kept.append(i)
            live = kept
            self.heartbeat()
        now = time.time()
        for i in live:
            p = pendings[i]
            try:
                rows = self._result_rows(p, results[i], now)
            except Exception as e:  # a task returned NaN, a non-JSON type, or text that cannot be encoded
                log.error("task.bad_output", result_id=p.rid, error=describe(e))
                kind = DeadLetterKind.BAD_OUTPUT if isinstance(e, TypeError | ValueError) else DeadLetterKind.INTERNAL
                self._dead_letter(made, p.item, route, kind, describe(e), p.note.input_id)
                continue
            size = len(rows[0][2])
            if size > self._limits.max_result_bytes:
                reason = f"result of {size} bytes, pipeline.max_result_bytes is {self._limits.max_result_bytes}"
                self._dead_letter(made, p.item, route, DeadLetterKind.RESULT_TOO_LARGE, reason, p.note.input_id)
                continue
            made.rows.extend(rows)
            if self._cfg.keep_results_s:  # for the digest and for corrections by result id
                made.recent.append((p.rid, p.item.received_at, rows[0][2]))
            made.outcomes.append(Outcome(p.item.topic, p.item.received_at, "ok", route.topic, p.note.input_id, p.rid))

    def _result_rows(self, p: _Pending, results: dict[str, Any], now: float) -> list[Row]:
        gw = self._cfg.gateway_id
        payload = result_payload(
            rid=p.rid,
            input_id=p.note.input_id,
            topic=p.item.topic,
            received_at=p.item.received_at,
            text=p.note.text,
            results=results,
            processed_at=now,
            gateway=gw,
        )
        topic = p.out_topic
        route = p.route
        if route.review_topic and any(r.get("review") for r in results.values() if isinstance(r, dict)):
            topic = output_topic(route.review_topic, p.item.topic, gw, p.levels)  # low confidence
        made = [(p.rid, topic, payload)]
        if route.retain_latest_topic:
            made.extend(self._latest(route.retain_latest_topic, p, results, payload))
        return made

    def _special_topics(self, cfg: Config) -> dict[str, Callable[[Inbound, _Made], None]]:
        """The topics that carry no notes but requests to the agent itself, and who answers each."""
        special: dict[str, Callable[[Inbound, _Made], None]] = {}
        if self._digester is not None and cfg.digest_request_topic:
            special[cfg.digest_request_topic] = self._digest_request
        if cfg.feedback_topic:
            special[cfg.feedback_topic] = self._correction
        return special

    def _digest_request(self, item: Inbound, made: _Made) -> None:
        """`{"from": RFC 3339, "to": RFC 3339, "request_id": "..."}` → a digest of that window (from the kept
        results), through the outbox like any result; anything else is a dead letter."""
        assert self._digester is not None
        try:
            req = json.loads(item.payload)
            if not isinstance(req, dict):
                raise ValueError("expected a JSON object")
            start, end = (instant(req[k]) for k in ("from", "to"))
            if end <= start:
                raise ValueError("'to' must be after 'from'")
            request_id = req.get("request_id")
            if request_id is not None and not isinstance(request_id, str):
                raise ValueError("'request_id' must be a string")
            digest = self._digester.build(self._outbox.recent_between(start, end), start, end, request_id)
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            reason = f'digest request: {describe(e)} (expected {{"from": RFC 3339, "to": RFC 3339, "request_id"}})'
            self._dead_letter(made, item, None, DeadLetterKind.BAD_REQUEST, reason)
            return
        made.rows.append((digest["id"], self._cfg.digest_topic, digest_dumps(digest)))
        made.outcomes.append(Outcome(item.topic, item.received_at, "ok", item.topic, digest.get("request_id"),
                                     digest["id"]))

    def _correction(self, item: Inbound, made: _Made) -> None:
        """A correction (edge_agent.feedback), stored with the batch; one that does not fit is a dead letter."""
        try:
            c = feedback.parse(item.payload, self._tasks, self._allows_new_labels, self._outbox.get_recent)
        except DecodeError as e:
            self._dead_letter(made, item, None, e.kind, e.reason)
            return
        made.corrected.append((c, item))
        self.corrections[c.task] += 1
        log.info("feedback.accepted", task=c.task, label=c.label, fields=c.fields, result_id=c.result_id,
                 agreed=c.agreed)
        made.outcomes.append(Outcome(item.topic, item.received_at, "ok", item.topic, c.result_id))

    def _learn(self, made: _Made) -> None:
        """After the commit (the corrections are durable), between two batches: a task due for it retrains.
        A failed retrain keeps the live head (process() logs it); it never fails or repeats the batch."""
        for name, learner in self._learners.items():
            mine = [c for c, _ in made.corrected if c.task == name and c.label is not None]
            if mine:
                learner.noted(len(mine), [c.agreed for c in mine if c.agreed is not None])
            if not learner.due():
                continue
            self.heartbeat()
            log.info("learn.retrained", **learner.retrain())
            self.heartbeat()

    def _allows_new_labels(self, task: str) -> bool:
        return bool(getattr(self._cfg.tasks.get(task), "allow_new_labels", False))

    def _check_stop(self) -> None:
        if self._stopping.is_set():
            raise _Abandoned

    def _commit(self, batch: list[Inbound], made: _Made) -> None:
        """Durable (synchronous=FULL) before any ack leaves. Under the commit lock, so that once stop()
        has set _stopping no commit starts, and the one in progress has finished."""
        with self._commit_lock:
            self._check_stop()
            if made.rows or made.dead or made.corrected:
                corrections = [c.row(item.received_at, item.topic) for c, item in made.corrected]
                self._outbox.put_many(made.rows, dead=made.dead, recent=made.recent, feedback=corrections,
                                      feedback_max_rows=self._cfg.feedback.max_rows)
            for item in batch:
                self._ack(item)
        self._on_commit()
        self.processed += len(batch)
        self.heartbeat()

    def _report(self, made: _Made) -> None:
        now = time.time()
        latencies = []
        for o in made.outcomes:
            latency = now - o.received_at
            latencies.append(latency)
            line: dict[str, Any] = {"topic": o.topic, "input_id": o.input_id, "outcome": o.outcome}
            if o.result_id is not None:
                line["result_id"] = o.result_id
            if o.kind is not None:
                line["kind"], line["reason"] = str(o.kind), o.reason
            log.info("message", latency_ms=round(latency * 1000, 2), **line)
        if self._metrics is not None:
            self._metrics.batch_done(made.routes_in, made.outcomes, latencies)

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
            raise DecodeError(DeadLetterKind.NO_ROUTE, f"no route matches topic {item.topic!r}")
        bucket = self._buckets.get(id(route))
        if bucket is not None and not bucket.take(1):
            # Before decode: a runaway publisher costs one dead-letter row each, never model time.
            raise DecodeError(DeadLetterKind.RATE_LIMITED,
                              f"rate limit: route {route.topic} over {route.rate_limit:g} msg/s")
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
            raise DecodeError(DeadLetterKind.TOPIC_TOO_LONG,
                              f"output topic too long: {len(longest)} bytes, MQTT allows {MAX_TOPIC_BYTES}")
        return [
            _Pending(item, route, result_id(gw, item.topic, out, input_id, item.payload), out,
                     Note(text=text, topic=item.topic, input_id=input_id, received_at=item.received_at), levels)
            for text, input_id in decoded
        ]

    def _dead_letter(self, made: _Made, item: Inbound, route: RouteConfig | None, kind: DeadLetterKind, reason: str,
                     input_id: str | None = None) -> None:
        """The outbox row for a message (or one note of it) that cannot be processed. Nothing is lost."""
        gw, topic = self._cfg.gateway_id, self._cfg.dead_letter_topic
        rid = result_id(gw, item.topic, topic, input_id, item.payload)
        payload = deadletter_payload(rid=rid, topic=item.topic, received_at=item.received_at, kind=kind,
                                     reason=reason, payload=item.payload, gateway=gw,
                                     keep_bytes=self._limits.dead_letter_payload_bytes)
        made.dead.append((rid, topic, payload))
        made.outcomes.append(Outcome(item.topic, item.received_at, "deadletter", route.topic if route else "",
                                     input_id, rid, kind, reason))
        self.dead_lettered += 1
        if kind is DeadLetterKind.RATE_LIMITED and route is not None:
            self.over_limit[route.topic] += 1

    def _run_task(self, name: str, notes: list[Note]) -> list[Any]:
        """One output per note: the task's dict, or _Failed for a note the task raises on even alone.

        A task that raises on a batch is run again note by note: the batch's other notes get their results
        and only the note that makes it fail is dead-lettered. On stop, the batch is abandoned instead.
        """
        try:
            t0 = time.perf_counter()
            out = self._tasks[name].process(notes)
            if self._metrics is not None:
                self._metrics.task_done(name, time.perf_counter() - t0, len(notes))
            if len(out) != len(notes):
                raise RuntimeError(f"task returned {len(out)} results for {len(notes)} notes")
            return out
        except _Abandoned:
            raise
        except Exception as e:
            if self._stopping.is_set():  # e.g. a model closed under us: never a result
                raise _Abandoned from e
            if len(notes) == 1:
                log.error("task.failed", task=name, input_id=notes[0].input_id, topic=notes[0].topic,
                          error=describe(e))
                return [_Failed(DeadLetterKind.TASK_FAILED, f"task {name!r}: {describe(e)}")]
            log.exception("task.batch_failed", task=name, batch=len(notes), then="each note alone")
            return [self._run_task(name, [note])[0] for note in notes]

    def _run(self) -> None:
        with progress(self._task_beat):  # tasks' heartbeat() calls on this thread land here
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
            except _Abandoned:
                log.warning("pipeline.batch_abandoned", size=len(batch),
                            hint="stopped past pipeline.drain_timeout_s; unacked, the broker redelivers it")
                return
            except Exception:
                # Not one message's fault (those are dead letters): the outbox could not commit. Nothing
                # was acked. Retrying the same batch is back-pressure (the broker stops sending at Receive
                # Maximum); on stop the broker redelivers it to our next session. No beat here: a batch
                # that never commits starves the watchdog, and systemd restarts us.
                log.exception("pipeline.batch_failed", size=len(batch), retry_in_s=delay)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 30.0)

    def swap(self, cfg: Config, tasks: dict[str, Task], learners: Mapping[str, Learner] | None = None) -> None:
        """Replace routes, limits and tasks between two batches (hot reload).

        The batch in progress finishes with the old set; the next one, including messages already queued,
        runs with the new set. Nothing is acked twice or skipped: acks follow each batch's commit as ever.
        """
        with self._batch_lock:
            self._cfg, self._limits, self._tasks, self._buckets = cfg, cfg.pipeline, tasks, _buckets(cfg)
            self._learners = dict(learners or {})
            self._special = self._special_topics(cfg)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Finish what is queued (bounded by timeout), then abandon the batch in progress, if any, uncommitted.
        True when the worker finished in time; False when it is still inside a task (which must then not be
        closed under it)."""
        self._inbox.put(_STOP)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        with self._commit_lock:  # a commit in progress completes; none starts after this
            self._stopping.set()
        self._thread.join(1.0)
        return not self._thread.is_alive()


def _bounded(value: Any, max_items: int) -> Any:
    """A task's result with every list in it cut to max_items, flagged `"truncated": true` when one was: a
    note dense with measurements must not make a result of megabytes (and a batch of them gigabytes). The
    common case, nothing to cut, returns the result itself: no copy on every note."""
    if not isinstance(value, dict) or not _over(value, max_items):
        return value

    def cut(node: Any) -> Any:
        if isinstance(node, list):
            return [cut(x) for x in node[:max_items]]
        if isinstance(node, dict):
            return {k: cut(v) for k, v in node.items()}
        return node

    out = cut(value)
    out["truncated"] = True
    return out


def _over(node: Any, max_items: int) -> bool:
    """Some list in node holds more than max_items."""
    if isinstance(node, list):
        return len(node) > max_items or any(_over(x, max_items) for x in node)
    if isinstance(node, dict):
        return any(_over(v, max_items) for v in node.values())
    return False


def _buckets(cfg: Config) -> dict[int, TokenBucket]:
    """A token bucket per rate-limited route (a reload starts them full again)."""
    return {id(r): TokenBucket(r.rate_limit, r.burst) for r in cfg.routes if r.rate_limit}
