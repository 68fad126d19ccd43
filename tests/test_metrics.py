"""Prometheus metrics: the real daemon (a subprocess) with real brokers, scraped over loopback HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import config
from edge_agent.errors import DeadLetterKind
from edge_agent.metrics import Metrics
from edge_agent.pipeline import Outcome

from .kit import REPO, wait_for
from .kit.agent import log_events
from .kit.broker import Broker, accepting, free_port
from .kit.config import write_config

MODEL = REPO / "models" / "minilm-l6"

CLASSIFIER = {
    "category": {
        "kind": "classifier",
        "model": MODEL,
        "intra_threads": 1,
        "labels": {"leak": "a fluid or gas is leaking", "noise": "a machine makes unusual noise or vibrates"},
    }
}

ROUTES = [{"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns", "category"]}]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.mark.skipif(not (MODEL / "manifest.json").is_file(), reason=f"no int8 encoder at {MODEL}")
def test_daemon_metrics_match_what_was_sent(tmp_path: Path, broker, spawn_agent, publisher) -> None:
    """20 notes and 2 malformed payloads with the uplink down: 22 in, 2 dead-lettered, 22 rows waiting.
    The uplink comes up: every row is acked and the outbox depth reaches 0. It goes down: a reconnect."""
    uplink = Broker(tmp_path / "uplink")  # not started yet
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       metrics={"enabled": True, "port": port}, tasks=CLASSIFIER, routes=ROUTES)
    agent = spawn_agent(cfg, tmp_path / "agent.log")
    try:
        assert wait_for(lambda: accepting(port), timeout=60), (tmp_path / "agent.log").read_text()
        assert wait_for(lambda: value(scrape(port), "edge_agent_connected", connection="source") == 1.0, timeout=30)
        assert wait_for(lambda: "gw-test-source" in broker.log() and "plant/+/notes" in broker.log(), timeout=30)
        pub = publisher(broker.port)
        for i in range(20):
            pub.note("plant/line1/notes", i)
        pub.publish("plant/line1/notes", b'{"text": "unterminated')
        pub.publish("plant/line1/notes", b"\xff\xfe not utf-8")

        route = "plant/+/notes"
        assert wait_for(lambda: value(scrape(port), "edge_agent_messages_in_total", route=route) == 22.0, timeout=60)
        s = scrape(port)
        assert value(s, "edge_agent_dead_lettered_total", reason="invalid_json") == 1.0
        assert value(s, "edge_agent_dead_lettered_total", reason="invalid_utf8") == 1.0
        assert value(s, "edge_agent_outbox_rows") == 22.0  # 20 results + 2 dead letters, uplink down
        assert value(s, "edge_agent_outbox_bytes") > 0
        assert value(s, "edge_agent_outbox_oldest_age_seconds") > 0
        assert value(s, "edge_agent_outbox_file_bytes") > 0
        assert value(s, "edge_agent_connected", connection="sink") == 0.0
        assert value(s, "edge_agent_results_acked_total") == 0.0
        assert value(s, "edge_agent_message_latency_seconds_count") == 22.0  # one per message, dead letters too
        batches = value(s, "edge_agent_task_batch_seconds_count", task="category")
        assert batches is not None and batches >= 1
        assert value(s, "edge_agent_task_note_seconds_count", task="patterns") >= 1
        manifest = json.loads((MODEL / "manifest.json").read_text())
        model = {k: v for (name, labels), _ in s.items() if name == "edge_agent_model_info" for k, v in labels}
        assert model == {"task": "category", "name": "minilm-l6", "kind": "encoder", "quantization": "int8",
                         "sha256": manifest["files"]["model.bin"]}
        assert any(name == "edge_agent_build_info" for name, _ in s)

        # While it was down: our warning with the address after each attempt, not paho's bare error line.
        down = log_events(tmp_path / "agent.log", "sink.unreachable")
        assert down and {(e["host"], e["port"], e["level"]) for e in down} == {("127.0.0.1", uplink.port, "warning")}
        assert "Client is not connected" not in (tmp_path / "agent.log").read_text()

        uplink.start()
        assert wait_for(lambda: value(scrape(port), "edge_agent_outbox_rows") == 0.0, timeout=60)
        s = scrape(port)
        assert value(s, "edge_agent_results_acked_total") == 22.0
        assert value(s, "edge_agent_results_published_total") >= 22.0
        assert value(s, "edge_agent_outbox_oldest_age_seconds") == 0.0
        assert value(s, "edge_agent_connected", connection="sink") == 1.0
        assert value(s, "edge_agent_reconnects_total", connection="sink") == 0.0
        assert value(s, "edge_agent_outbox_dropped_total", reason="max_bytes") == 0.0

        uplink.stop()
        assert wait_for(lambda: value(scrape(port), "edge_agent_reconnects_total", connection="sink") == 1.0,
                        timeout=30)
        assert value(scrape(port), "edge_agent_connected", connection="sink") == 0.0
    finally:
        uplink.stop()
    assert agent.kill(15) == 0



def test_rows_the_uplink_refuses_stay_until_it_accepts(tmp_path: Path, broker, spawn_agent, publisher, collect) -> None:
    """The uplink's ACL refuses our result topic (Mosquitto answers PUBACK 0x87 not authorized): every row stays
    in the outbox, each refusal is logged and counted, and nothing is lost. Once the ACL allows the topic
    (Mosquitto re-reads it on SIGHUP), the retried rows are delivered and leave the outbox."""
    uplink = Broker(tmp_path / "uplink")
    acl = uplink.dir / "acl"
    acl.write_text("topic read #\ntopic write edge/status/#\n")  # results and dead letters refused
    with uplink.conf.open("a") as f:
        f.write(f"acl_file {acl}\n")
    uplink.start()
    port = free_port()
    log = tmp_path / "agent.log"
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       metrics={"enabled": True, "port": port})
    results = collect(uplink.port, "edge/results/#")
    spawn_agent(cfg, log)
    try:
        assert wait_for(lambda: accepting(port), timeout=60), log.read_text()
        assert wait_for(lambda: value(scrape(port), "edge_agent_connected", connection="source") == 1.0, timeout=30)
        assert wait_for(lambda: "plant/+/notes" in broker.log(), timeout=30)
        pub = publisher(broker.port)
        for i in range(5):
            pub.note("plant/line1/notes", i)
        assert wait_for(lambda: value(scrape(port), "edge_agent_results_rejected_total") >= 5.0, timeout=30), \
            log.read_text()[-2000:]
        refused = log_events(log, "sink.publish_rejected")
        assert refused and all(e["reason"] == "Not authorized" for e in refused)
        assert {e["topic"] for e in refused} == {"edge/results/plant/line1/notes"}
        s = scrape(port)
        assert value(s, "edge_agent_outbox_rows") == 5.0 and value(s, "edge_agent_results_acked_total") == 0.0
        assert results.json() == []

        acl.write_text("topic read #\ntopic write edge/#\n")
        uplink.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: value(scrape(port), "edge_agent_outbox_rows") == 0.0, timeout=30), \
            log.read_text()[-2000:]
        assert wait_for(lambda: len(results.json()) >= 5, timeout=10)
        assert sorted({r["input_id"] for r in results.json()}) == ["n0", "n1", "n2", "n3", "n4"]
        assert value(scrape(port), "edge_agent_results_acked_total") == 5.0
    finally:
        uplink.stop()


def test_metrics_are_opt_in_and_loopback_by_default() -> None:
    cfg = config.parse({"routes": [{"topic": "a/b"}]}, environ={})
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (False, "127.0.0.1", 9464)


def test_metrics_port_in_use_is_a_config_error(tmp_path: Path, broker) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port,
                           outbox=tmp_path / "o.db", metrics={"enabled": True, "port": port})
        done = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "metrics.port" in done.stderr and f"127.0.0.1:{port}" in done.stderr


def test_dead_letters_counted_by_their_kind_and_ignored_payloads_per_route() -> None:
    """Labels come from the typed kind made where the dead letter is made, never from the reason's text:
    rate-limited, over-long-topic and bad-Sparkplug dead letters have their own label (they were "other")."""
    m = Metrics()
    outcomes = [
        Outcome("a/1", 0.0, "deadletter", "a/+", kind=DeadLetterKind.RATE_LIMITED, reason="rate limit: route a/+"),
        Outcome("a/2", 0.0, "deadletter", "a/+", kind=DeadLetterKind.TOPIC_TOO_LONG, reason="output topic too long"),
        Outcome("spBv1.0/g/DDATA/n", 0.0, "deadletter", "spBv1.0/#", kind=DeadLetterKind.BAD_SPARKPLUG, reason="x"),
        Outcome("spBv1.0/g/DDATA/n", 0.0, "ignored", "spBv1.0/#"),
        Outcome("a/3", 0.0, "ok", "a/+", result_id="r"),
    ]
    m.batch_done({"a/+": 3, "spBv1.0/#": 2}, outcomes, [0.1] * len(outcomes))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect() for s in f.samples}
    assert got[("edge_agent_dead_lettered_total", (("reason", "rate_limited"),))] == 1.0
    assert got[("edge_agent_dead_lettered_total", (("reason", "topic_too_long"),))] == 1.0
    assert got[("edge_agent_dead_lettered_total", (("reason", "bad_sparkplug"),))] == 1.0
    assert got[("edge_agent_messages_ignored_total", (("route", "spBv1.0/#"),))] == 1.0
    assert got[("edge_agent_messages_in_total", (("route", "a/+"),))] == 3.0
    assert not any(name == "edge_agent_dead_lettered_total" and dict(labels)["reason"] == "other"
                   for name, labels in got)


def test_idle_connections_cost_a_bounded_number_of_threads(tmp_path: Path, broker, spawn_agent) -> None:
    """300 idle TCP connections to the endpoint of the real daemon: at most MAX_CONNECTIONS threads more,
    and a scrape gets through once the idle ones have timed out (prometheus_client's server: 300 threads)."""
    from edge_agent import metrics

    max_connections = getattr(metrics, "MAX_CONNECTIONS", 8)
    idle_timeout = getattr(metrics, "CONNECTION_TIMEOUT_S", 5.0)
    port = free_port()
    log = tmp_path / "agent.log"
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       metrics={"enabled": True, "port": port})
    agent = spawn_agent(cfg, log)
    assert wait_for(lambda: accepting(port), timeout=60), log.read_text()
    assert wait_for(lambda: value(scrape(port), "edge_agent_connected", connection="sink") == 1.0, timeout=30)
    tasks = Path(f"/proc/{agent.proc.pid}/task")

    def threads() -> int:
        return len(list(tasks.iterdir()))

    before = threads()
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # let the daemon accept them all
        assert threads() <= before + max_connections, (before, threads())
        ok = wait_for(lambda: _scrapes(port), timeout=idle_timeout * 3, interval=0.5)
        assert ok, "no scrape got through after the idle connections timed out"
    finally:
        for s in idle:
            s.close()
    assert wait_for(lambda: threads() <= before, timeout=idle_timeout * 3)
    assert "Traceback" not in log.read_text()


def _scrapes(port: int) -> bool:
    try:
        return value(scrape(port), "edge_agent_connected", connection="source") is not None
    except OSError:
        return False


def test_sink_on_mqtt_311_warns_that_refused_results_are_lost(tmp_path: Path, broker, collect, spawn_agent,
                                                              publisher) -> None:
    """The loss this warns about, pinned with a real Mosquitto ACL: with sink.protocol = "3.1.1" the broker
    PUBACKs the 5 refused results (3.1.1 has no reason code), so they leave the outbox and nobody gets them.
    check-config and the daemon's start both say so and recommend MQTT 5 (see the MQTT 5 test above)."""
    uplink = Broker(tmp_path / "uplink")
    acl = uplink.dir / "acl"
    acl.write_text("topic read #\ntopic write edge/status/#\n")
    with uplink.conf.open("a") as f:
        f.write(f"acl_file {acl}\n")
    uplink.start()
    port = free_port()
    log = tmp_path / "agent.log"
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       metrics={"enabled": True, "port": port}, sink={"protocol": "3.1.1"})
    checked = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(cfg)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and 'warning: sink.protocol = "3.1.1"' in checked.stdout
    assert 'sink.protocol = \\"5\\"' in checked.stdout or 'sink.protocol = "5"' in checked.stdout
    results = collect(uplink.port, "edge/results/#")
    spawn_agent(cfg, log)
    try:
        assert wait_for(lambda: log_events(log, "sink.protocol_3_1_1"), timeout=60), log.read_text()
        assert "MQTT 5" in log_events(log, "sink.protocol_3_1_1")[0]["hint"]
        assert wait_for(lambda: accepting(port), timeout=60)
        assert wait_for(lambda: value(scrape(port), "edge_agent_connected", connection="sink") == 1.0, timeout=30)
        assert wait_for(lambda: "plant/+/notes" in broker.log(), timeout=30)
        pub = publisher(broker.port)
        for i in range(5):
            pub.note("plant/line1/notes", i)
        assert wait_for(lambda: value(scrape(port), "edge_agent_results_acked_total") == 5.0, timeout=30)
        s = scrape(port)
        assert value(s, "edge_agent_outbox_rows") == 0.0 and value(s, "edge_agent_results_rejected_total") == 0.0
        time.sleep(1.0)
        assert results.json() == []  # lost: what the warning is for
    finally:
        uplink.stop()
