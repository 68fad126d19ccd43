"""End to end against real Mosquitto brokers: nothing lost, exact outcomes."""

from __future__ import annotations

import json
import signal
import threading
import time
from base64 import b64decode
from hashlib import sha256
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.outbox.store import Outbox

from .kit import REPO, wait_for
from .kit.broker import Broker
from .kit.clients import Publisher
from .kit.config import write_config
from .kit.proxy import FaultProxy


def ids_of(results: list[dict]) -> list[str]:
    return [r["input_id"] for r in results]


def test_500_notes_all_arrive_with_their_input_ids(tmp_path, broker, uplink, collect, publisher, run_agent):
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
    out = collect(uplink.port, "edge/results/#")
    agent = run_agent(cfg)
    pub = publisher(broker.port)
    for i in range(500):
        pub.note("plant/line1/notes", i)
    assert wait_for(lambda: len(out.json()) >= 500, 60), len(out.json())
    results = out.json()
    assert sorted(set(ids_of(results))) == sorted(f"n{i}" for i in range(500))
    assert len(results) == 500
    first = next(r for r in results if r["input_id"] == "n7")
    assert first["schema"] == "edge-agent/result/1"
    assert first["source"]["topic"] == "plant/line1/notes"
    assert first["text"] == "P-107 at 7 bar"
    assert first["gateway"] == "gw-test"
    assert first["replayed"] is False
    assert first["results"]["patterns"]["assets"][0]["text"] == "P-107"
    assert len({r["id"] for r in results}) == 500
    agent.stop()
    # Every row was PUBACKed, so a clean stop leaves the outbox empty.
    with Outbox(agent.agent.cfg.outbox) as ob:
        assert ob.stats().count == 0


def test_uplink_outage_backlog_replayed_in_order(tmp_path, broker, uplink, collect, publisher, run_agent):
    # The sink reaches the uplink through a proxy that stays closed until the consumer is back: Mosquitto
    # 2.0.11 drops QoS 1 messages for a restored persistent session that arrive after a SIGKILL restart but
    # before its client reconnects (seen here: 0 of 50 in 2 of 3 tries), and the sink, reconnecting first,
    # cost the consumer the first ~190 replayed results about one run in ten (all PUBACKed to the sink).
    proxy = FaultProxy(uplink.port).start()
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=proxy.port, outbox=tmp_path / "o.db")
    out = collect(uplink.port, "edge/results/#")
    run_agent(cfg)
    pub = publisher(broker.port)
    n = 0

    def send(count: int, topic: str) -> None:
        nonlocal n
        for _ in range(count):
            pub.note(topic, n)
            n += 1

    send(20, "plant/a/notes")
    assert wait_for(lambda: len(out.json()) == 20)
    # Let the uplink autosave (1 s) the consumer's session, or results that arrive after its restart but
    # before the consumer re-subscribes would have no subscriber: a test artefact, not a loss of ours.
    time.sleep(1.5)
    uplink.stop(signal.SIGKILL)
    proxy.refuse()  # after the kill: the outage is the broker's; the proxy only holds the sink back later
    out.subscribed.clear()
    t_down = time.monotonic()
    while time.monotonic() - t_down < 10.5:  # notes keep arriving while the uplink is down
        send(5, "plant/a/notes")
        send(5, "plant/b/notes")
        time.sleep(0.2)
    during = n
    uplink.start()
    assert out.subscribed.wait(20)  # the consumer is back and subscribed; now the sink may reconnect
    proxy.heal()
    send(30, "plant/a/notes")
    total = n
    ok = wait_for(lambda: len({r["input_id"] for r in out.json()}) == total, 60)
    results = out.json()
    got = {r["input_id"] for r in results}
    assert ok, sorted({f"n{i}" for i in range(total)} - got, key=lambda x: int(x[1:]))
    assert got == {f"n{i}" for i in range(total)}
    replayed = [int(r["input_id"][1:]) for r in results if r["replayed"]]
    # Everything sent during the outage is backlog, flagged replayed.
    assert set(range(20, during)) <= set(replayed)
    for route in ("plant/a/notes", "plant/b/notes"):
        for flag in (True, False):
            seq = [int(r["input_id"][1:]) for r in results if r["source"]["topic"] == route and r["replayed"] is flag]
            dedup = list(dict.fromkeys(seq))
            assert dedup == sorted(dedup), f"{route} replayed={flag} out of order"
    proxy.close()


def test_malformed_payloads_dead_lettered_and_daemon_keeps_running(tmp_path, broker, collect, publisher, run_agent):
    cfg = write_config(
        tmp_path / "c.toml",
        source_port=broker.port,
        sink_port=broker.port,
        outbox=tmp_path / "o.db",
        pipeline={"max_payload_bytes": 1000, "max_json_depth": 8},
    )
    dlq = collect(broker.port, "edge/deadletter")
    out = collect(broker.port, "edge/results/#")
    run_agent(cfg)
    pub = publisher(broker.port)
    cases = {
        b"\xff\xfe not utf-8": "invalid UTF-8 at byte 0",
        b"x" * 1001: "payload too large: 1001 bytes, limit 1000",
        b'{"text": "unterminated': "invalid JSON",
        b'{"a":' * 20 + b"1" + b"}" * 20: "nested deeper than 8",  # depth is checked before fields
        b'{"text": "t", "x": [[[[[[[[[1]]]]]]]]]}': "nested deeper than 8",
        b'{"text": "t", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "payload too large",
        b'{"msg": "no text field"}': "missing field 'text'",
        b'{"text": 42}': "field 'text' is a number, expected a string",
        b'{"text": null}': "field 'text' is a null, expected a string",
        b'{"text": "ok", "id": {"nested": 1}}': "field 'id' is a object, expected a string or integer",
        b'{"text": NaN}': "NaN is not allowed",
        b"   ": "empty text",
    }
    for payload in cases:
        pub.publish("plant/bad/notes", payload)
    pub.note("plant/good/notes", 1)
    assert wait_for(lambda: len(dlq.json()) >= len(cases) and len(out.json()) >= 1)
    records = dlq.json()
    assert len(records) == len(cases)
    # A dead letter keeps the payload up to pipeline.dead_letter_payload_bytes, else a prefix and its sha256.
    by_payload = {r["payload_sha256"] if r.get("truncated") else sha256(b64decode(r["payload_b64"])).hexdigest(): r
                  for r in records}  # fmt: skip
    for payload, reason in cases.items():
        rec = by_payload[sha256(payload).hexdigest()]
        assert reason in rec["reason"], (payload[:40], rec["reason"])
        assert rec["schema"] == "edge-agent/deadletter/1"
        assert rec["source"]["topic"] == "plant/bad/notes"
    assert out.json()[0]["input_id"] == "n1"


def test_plain_text_payload_is_a_note(tmp_path, broker, collect, publisher, run_agent):
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db")
    out = collect(broker.port, "edge/results/#")
    run_agent(cfg)
    publisher(broker.port).publish("plant/l2/notes", "  pump P-7 vibration 7.1 mm/s ")
    assert wait_for(lambda: len(out.json()) == 1)
    r = out.json()[0]
    assert r["text"] == "  pump P-7 vibration 7.1 mm/s "
    assert r["input_id"] is None
    m = r["results"]["patterns"]["measurements"][0]
    assert r["text"][m["start"] : m["end"]] == "7.1 mm/s"


def test_corrupt_outbox_moved_aside_and_daemon_runs(tmp_path, broker, collect, publisher, run_agent):
    db = tmp_path / "o.db"
    db.write_bytes(b"this is not a database" * 100)
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=db)
    out = collect(broker.port, "edge/results/#")
    run_agent(cfg)
    aside = list(tmp_path.glob("o.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == b"this is not a database" * 100
    publisher(broker.port).note("plant/x/notes", 5)
    assert wait_for(lambda: len(out.json()) == 1)
    assert out.json()[0]["input_id"] == "n5"


def _subscribed(b: Broker) -> bool:
    """Mosquitto logs each SUBSCRIBE; the agent's source client id ends in -source."""
    return "gw-test-source" in b.log() and "plant/+/notes" in b.log()


def _publish_in_background(port: int, topic: str, count: int, pace_s: float) -> threading.Thread:
    def go() -> None:
        p = Publisher(port)
        for i in range(count):
            p.note(topic, i)
            time.sleep(pace_s)
        p.close()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_agent_sigkill_mid_stream_loses_nothing(tmp_path, broker, uplink, collect, spawn_agent):
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
    out = collect(uplink.port, "edge/results/#")
    agent = spawn_agent(cfg, tmp_path / "agent.log")
    # The agent's session must exist at the broker before we publish, or early notes have no subscriber.
    assert wait_for(lambda: _subscribed(broker), 20)
    total = 400
    feeder = _publish_in_background(broker.port, "plant/k/notes", total, 0.005)
    assert wait_for(lambda: len(out.json()) >= 50, 30)
    assert agent.kill(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(0.5)
    agent = spawn_agent(cfg, tmp_path / "agent.log")
    feeder.join(60)
    expected = {f"n{i}" for i in range(total)}
    assert wait_for(lambda: {r["input_id"] for r in out.json()} == expected, 60), len(
        {r["input_id"] for r in out.json()}
    )
    by_input: dict[str, set[str]] = {}
    for r in out.json():
        by_input.setdefault(r["input_id"], set()).add(r["id"])
    assert all(len(ids) == 1 for ids in by_input.values()), "a duplicate carried a different result id"
    assert agent.kill(signal.SIGTERM) == 0


def test_source_broker_sigkill_mid_stream_loses_nothing(tmp_path, uplink, collect, spawn_agent, publisher):
    b = Broker(tmp_path / "b")
    # Save after every change: what the broker PUBACKed must survive its SIGKILL (Mosquitto's own
    # durability is not what this test is about).
    b.conf.write_text(b.conf.read_text() + "autosave_on_changes true\n")
    b.start()
    try:
        cfg = write_config(tmp_path / "c.toml", source_port=b.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
        out = collect(uplink.port, "edge/results/#")
        agent = spawn_agent(cfg, tmp_path / "agent.log")
        assert wait_for(lambda: _subscribed(b), 20)
        assert agent.kill(signal.SIGTERM) == 0
        # Notes queue up in the agent's persistent session while it is down...
        total = 1500
        pub = publisher(b.port)
        for i in range(total):
            pub.note("plant/m/notes", i)
        time.sleep(1.5)
        # ...then the agent drains them, and the broker dies mid-stream.
        agent = spawn_agent(cfg, tmp_path / "agent.log")
        assert wait_for(lambda: len(out.json()) >= 100, 30)
        b.stop(signal.SIGKILL)
        received_at_kill = len({r["input_id"] for r in out.json()})
        time.sleep(1.0)
        b.start()
        expected = {f"n{i}" for i in range(total)}
        assert wait_for(lambda: {r["input_id"] for r in out.json()} == expected, 90), len(
            {r["input_id"] for r in out.json()}
        )
        assert received_at_kill < total, "the kill came after the stream ended: nothing was tested"
        assert agent.kill(signal.SIGTERM) == 0
    finally:
        b.stop()


def test_status_topic_birth_and_offline(tmp_path, broker, collect, run_agent):
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db")
    status = collect(broker.port, "edge/status/#")
    r = run_agent(cfg)
    assert wait_for(lambda: any(json.loads(p)["state"] == "online" for _, p, _ in status.messages))
    r.stop()
    assert wait_for(lambda: json.loads(status.messages[-1][1])["state"] == "offline")


def test_mqtt_311_on_both_sides(tmp_path, broker, uplink, collect, publisher, run_agent):
    cfg = write_config(
        tmp_path / "c.toml",
        source_port=broker.port,
        sink_port=uplink.port,
        outbox=tmp_path / "o.db",
        source={"protocol": "3.1.1"},
        sink={"protocol": "3.1.1"},
    )
    out = collect(uplink.port, "edge/results/#")
    running = run_agent(cfg)
    assert running.agent.cfg.source.protocol == "3.1.1" and running.agent.cfg.sink.protocol == "3.1.1"
    pub = publisher(broker.port)
    for i in range(100):
        pub.note("plant/v3/notes", i)
    assert wait_for(lambda: len(out.json()) >= 100)
    assert sorted(ids_of(out.json())) == sorted(f"n{i}" for i in range(100))


MINILM = REPO / "models" / "minilm-l6"


@pytest.mark.skipif(not (MINILM / "manifest.json").exists(), reason="models/minilm-l6 not built (.ci/setup builds it)")
def test_model_tasks_in_the_mqtt_pipeline(tmp_path, broker, collect, publisher, run_agent):
    tasks = {
        "category": {
            "kind": "classifier",
            "model": MINILM,
            "threshold": 0.6,
            "labels": {
                "leak": "fluid leaking from a seal, pipe or valve",
                "electrical": "electrical fault, tripped breaker",
            },
        },
        "logs": {"kind": "log_template"},
    }
    routes = [{"topic": "plant/+/notes", "id_field": "id", "review_topic": "edge/review/{topic}",
               "tasks": ["patterns", "category", "logs"]}]
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       routes=routes, tasks=tasks)
    out = collect(broker.port, "edge/#")
    run_agent(cfg)
    pub = publisher(broker.port)
    notes = ["P-101 seal leaking, oil under the pump", "breaker tripped on motor M-7, 32 A", "shift handover"]
    for i, text in enumerate(notes):
        pub.note("plant/l1/notes", i, text)
    results = lambda: [r for r in out.json() if r.get("schema") == "edge-agent/result/1"]  # noqa: E731
    assert wait_for(lambda: len(results()) == 3, 60)
    by_id = {r["input_id"]: r for r in results()}
    assert by_id["n0"]["results"]["category"]["label"] == "leak"
    assert by_id["n1"]["results"]["category"]["label"] == "electrical"
    assert by_id["n1"]["results"]["patterns"]["measurements"][0]["normalized"] == {"value": 32.0, "unit": "A"}
    for r in by_id.values():
        scores = r["results"]["category"]["scores"]
        assert abs(sum(scores.values()) - 1) < 1e-3
        assert r["results"]["logs"]["template"]
    # Where the classifier is unsure, the result goes to the review topic instead of the results topic.
    assert by_id["n2"]["results"]["category"]["review"] is True  # "shift handover" is neither
    topics = {json.loads(p)["input_id"]: t for t, p, _ in out.messages if t.startswith("edge/re")}
    for input_id, r in by_id.items():
        unsure = r["results"]["category"]["review"]
        assert topics[input_id] == ("edge/review/plant/l1/notes" if unsure else "edge/results/plant/l1/notes")



def test_broker_that_drops_us_after_connack_is_retried_with_back_off(tmp_path: Path, broker, uplink,
                                                                    spawn_agent) -> None:
    """A real Mosquitto that accepts the sink (CONNACK) and drops it right after: another client keeps taking
    the sink's client id over, coming back 50 ms after each time the sink takes it back. paho resets its
    delay at each CONNACK, so the sink came back every reconnect_min_delay (1 s) forever: ~15 times in
    15 s. Now each short-lived connection doubles the delay, capped: 1, 2, 4, 8, 8 s."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from .kit.agent import log_events

    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       sink={"reconnect_min_delay": 1, "reconnect_max_delay": 8})
    log = tmp_path / "agent.log"
    agent = spawn_agent(cfg, log)
    assert wait_for(lambda: "as edge-agent-gw-test-sink" in uplink.log(), timeout=60), log.read_text()

    kicked: list[float] = []  # each time the sink came back and took the id from the rogue
    rogue = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-agent-gw-test-sink",
                        protocol=MQTTProtocolVersion.MQTTv5)
    rogue.reconnect_delay_set(0.05, 0.05)
    rogue.on_disconnect = lambda *_: kicked.append(time.monotonic())
    rogue.connect_async("127.0.0.1", uplink.port, keepalive=10)
    rogue.loop_start()
    try:
        time.sleep(16)
    finally:
        rogue.disconnect()
        rogue.loop_stop()
    assert len(kicked) <= 6, f"the sink came back {len(kicked)} times in 16 s: no back-off"
    assert len(kicked) >= 2  # it does come back, though
    warned = log_events(log, "sink.unstable")
    assert [e["retry_in_s"] for e in warned][:3] == [2.0, 4.0, 8.0], warned
    assert agent.alive()

def test_reconnect_backoff_resets_after_a_stable_connection() -> None:
    from edge_agent.mqtt.client import STABLE_AFTER_S, ReconnectBackoff

    class Client:
        delays: list[float] = []  # noqa: RUF012 (one instance)

        def reconnect_delay_set(self, lo: float, hi: float) -> None:
            self.delays.append(lo)

    now = [0.0]
    cfg = config.parse({"routes": [{"topic": "a"}], "sink": {"reconnect_min_delay": 1, "reconnect_max_delay": 8}},
                       environ={}).sink
    b = ReconnectBackoff(Client(), cfg, "sink", clock=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(5):  # up for 0.1 s each time
        b.connected()
        now[0] += 0.1
        b.disconnected()
    assert Client.delays == [2, 4, 8, 8, 8]
    assert b.disconnected() == 8  # a failed attempt in between changes nothing (paho doubles those itself)
    b.connected()
    now[0] += STABLE_AFTER_S
    assert b.disconnected() == 1 and Client.delays[-1] == 1
