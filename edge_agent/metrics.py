"""Prometheus metrics on a loopback HTTP port: what a plant engineer scrapes to see the agent is healthy.

The Agent owns one `CollectorRegistry` (never prometheus_client's process-global one: tests run several
Agents in one process, and a library's stray metrics would leak onto our endpoint). Two kinds of metric:
- events the pipeline reports once per batch (messages in, dead letters, latencies): a lock and an add,
  nothing per message beyond a histogram observe;
- state read at scrape time by `_StateCollector` (outbox depth, bytes, oldest age, drops, reconnects,
  connected): the counters the stages keep anyway, so the hot paths carry no instrumentation at all.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .config import MetricsConfig
from .errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    from .mqtt.sink import Sink
    from .mqtt.source import Source
    from .outbox.store import Outbox
    from .pipeline import Outcome

# Seconds. A rule-based task takes well under a millisecond per note, the generator seconds per batch.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The endpoint serves a scraper or two: a thread per connection, at most this many at once, each connection
# given this long to send its request. Connections beyond the bound are closed at once, so 300 idle sockets
# cost 300 accepts and no thread more (prometheus_client's own server starts a thread for every one).
MAX_CONNECTIONS = 8
CONNECTION_TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S  # socketserver applies it to the connection: an idle client is dropped

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not log lines."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # a burst of connects waits in the kernel's accept queue, not in SYN retries

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)  # full: the scraper retries at its next interval
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An idle client timed out or hung up: socketserver would print a traceback to stderr for it."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_in = Counter("edge_agent_messages_in", "Inbound messages taken for processing, per route "
                                   "(route = its topic filter; \"\" for a topic no route matches)", ["route"],
                                   registry=r)
        self.dead_lettered = Counter("edge_agent_dead_lettered", "Inbound messages (or notes) dead-lettered, by "
                                     "kind (a closed set: edge_agent.errors.DeadLetterKind)", ["reason"], registry=r)
        self.ignored = Counter("edge_agent_messages_ignored", "Valid inbound messages that hold no note (a "
                               "Sparkplug B DDATA of measurements only), per route", ["route"], registry=r)
        self.latency = Histogram("edge_agent_message_latency_seconds", "Inbound message received to its result "
                                 "committed to the outbox", buckets=_BUCKETS, registry=r)
        self.task_batch = Histogram("edge_agent_task_batch_seconds", "Time of one task call over a batch",
                                    ["task"], buckets=_BUCKETS, registry=r)
        self.task_note = Histogram("edge_agent_task_note_seconds", "Time per note of one task call (batch time / "
                                   "notes, observed once per batch)", ["task"], buckets=_BUCKETS, registry=r)
        self.models = Info("edge_agent_model", "The model each model task loaded (from its verified manifest)",
                           ["task"], registry=r)
        Info("edge_agent_build", "edge-agent version", registry=r).info(
            {"version": __version__, "python": platform.python_version()})
        self._server: Any = None

    # -- events (the pipeline thread) ---------------------------------------------------------------
    def batch_done(self, routes_in: Mapping[str, int], outcomes: Iterable[Outcome], latencies: Iterable[float]) -> None:
        for route, n in routes_in.items():
            self.messages_in.labels(route).inc(n)
        for o in outcomes:
            if o.kind is not None:
                self.dead_lettered.labels(str(o.kind)).inc()
            elif o.outcome == "ignored":
                self.ignored.labels(o.route).inc()
        for seconds in latencies:
            self.latency.observe(max(seconds, 0.0))  # a wall-clock step back must not make it negative

    def task_done(self, task: str, seconds: float, notes: int) -> None:
        self.task_batch.labels(task).observe(seconds)
        if notes:
            self.task_note.labels(task).observe(seconds / notes)

    # -- state and identity (the agent, at start) ---------------------------------------------------
    def watch(self, outbox: Outbox, source: Source, sink: Sink) -> None:
        self.registry.register(_StateCollector(outbox, source, sink))

    def watch_learning(self, agent: Any) -> None:
        """Corrections and on-gateway retraining, read from the agent's pipeline and learners at scrape time
        (both are replaced by a reload, so the agent, which owns them, is what is watched)."""
        self.registry.register(_LearningCollector(agent))

    def loaded(self, tasks: Mapping[str, Any]) -> None:
        """Export each model task's manifest identity (name, kind, quantization, weights sha256)."""
        for name, task in tasks.items():
            manifest = getattr(task, "manifest", None) or getattr(getattr(task, "encoder", None), "manifest", None)
            if manifest:
                self.models.labels(name).info({
                    "name": str(manifest.get("name", "")),
                    "kind": str(manifest.get("kind", "")),
                    "quantization": str(manifest.get("quantization", "")),
                    "sha256": str(manifest.get("files", {}).get("model.bin", "")),
                })

    # -- the endpoint ---------------------------------------------------------------------------
    def serve(self, cfg: MetricsConfig) -> None:
        """Listen on cfg.host:cfg.port (a thread of its own). A port in use is a config error at start."""
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
            server_class = type("_Server", (_BoundedServer,), {"address_family": family})
            self._server = make_server(sockaddr[0], cfg.port, make_wsgi_app(self.registry), server_class,
                                       handler_class=_QuietHandler)
            threading.Thread(target=self._server.serve_forever, name="edge-agent-metrics", daemon=True).start()
        except OSError as e:
            raise ConfigError("metrics.port", f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}",
                              "pick a free port, or set [metrics] enabled = false") from None

    @property
    def port(self) -> int:
        if self._server is None:
            raise EdgeAgentError("the metrics endpoint is not serving")
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _LearningCollector(Collector):
    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        pipeline = self._agent.pipeline
        if pipeline is None:
            return
        received = CounterMetricFamily("edge_agent_corrections", "Corrections accepted on the feedback topic, per "
                                       "task", labels=["task"])  # fmt: skip
        for task, n in sorted(pipeline.corrections.items()):
            received.add_metric([task], n)
        yield received
        learners = dict(self._agent.learners)
        agreement = GaugeMetricFamily("edge_agent_live_agreement", "Share of the last 100 corrections of a "
                                      "published result that the live head had already got right", labels=["task"])
        runs = CounterMetricFamily("edge_agent_retrains", "Head retrains on the gateway, by outcome",
                                   labels=["task", "outcome"])
        for name, lr in sorted(learners.items()):
            if lr.agreement:
                agreement.add_metric([name], sum(lr.agreement) / len(lr.agreement))
            runs.add_metric([name, "swapped"], lr.swaps)
            runs.add_metric([name, "rejected"], lr.rejections)
        yield agreement
        yield runs


class _StateCollector(Collector):
    """Reads the stages' own counters at scrape time: exact, and free between scrapes."""

    def __init__(self, outbox: Outbox, source: Source, sink: Sink) -> None:
        self._outbox, self._source, self._sink = outbox, source, sink

    def describe(self) -> list[Metric]:
        return []  # unchecked: the names below are fixed and collide with nothing in Metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._links()
        try:
            s = self._outbox.stats()
        except EdgeAgentError:
            return  # closed (stopping): no outbox figures rather than a failed scrape
        age = 0.0 if s.oldest_created_at is None else max(time.time() - s.oldest_created_at, 0.0)
        yield GaugeMetricFamily("edge_agent_outbox_rows", "Rows waiting in the outbox", value=s.count)
        yield GaugeMetricFamily("edge_agent_outbox_bytes", "Payload and topic bytes waiting in the outbox",
                                value=s.bytes)
        yield GaugeMetricFamily("edge_agent_outbox_oldest_age_seconds", "Age of the oldest waiting row (0 when "
                                "empty)", value=age)
        yield GaugeMetricFamily("edge_agent_outbox_file_bytes", "Outbox database file and WAL on disk",
                                value=_file_bytes(s.path))
        dropped = CounterMetricFamily("edge_agent_outbox_dropped", "Rows dropped by a bound, oldest first",
                                      labels=["reason"])
        dropped.add_metric(["max_bytes"], s.dropped_max_bytes)
        dropped.add_metric(["max_age"], s.dropped_max_age)
        dropped.add_metric(["dead_letter_max_bytes"], s.dropped_dead_letter_max_bytes)
        yield dropped
        yield CounterMetricFamily("edge_agent_outbox_corrupt_files", "Corrupt outbox files moved aside at open",
                                  value=s.corrupt_files)
        yield CounterMetricFamily("edge_agent_outbox_files_lost", "Outbox files deleted or replaced under the "
                                  "running daemon (each recreated with the rows it held)", value=s.files_lost)
        yield CounterMetricFamily("edge_agent_results_acked", "Outbox rows (results and dead letters) the uplink "
                                  "broker acknowledged", value=s.accepted)

    def _links(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily("edge_agent_connected", "1 while the broker connection is up",
                                      labels=["connection"])
        reconnects = CounterMetricFamily("edge_agent_reconnects", "Connections lost after being up",
                                         labels=["connection"])
        for name, link in (("source", self._source), ("sink", self._sink)):
            connected.add_metric([name], float(link.connected.is_set()))
            reconnects.add_metric([name], link.reconnects)
        yield connected
        yield reconnects
        yield CounterMetricFamily("edge_agent_results_published", "Outbox rows handed to the uplink client "
                                  "(replays included)", value=self._sink.published)
        yield CounterMetricFamily("edge_agent_results_replayed", "Backlog rows replayed after an outage or restart",
                                  value=self._sink.replayed)
        yield CounterMetricFamily("edge_agent_results_rejected", "Publishes the uplink broker refused (PUBACK "
                                  "reason code >= 0x80, e.g. not authorized); the row stays and is retried",
                                  value=self._sink.rejected)
        yield CounterMetricFamily("edge_agent_results_oversized", "Rows over the uplink's Maximum Packet Size, "
                                  "replaced by a small dead letter (kind packet_too_large)", value=self._sink.oversized)


def _file_bytes(path: os.PathLike[str] | str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):  # no -wal after a clean stop
            total += os.stat(f"{os.fspath(path)}{suffix}").st_size
    return total
