"""Per-route limits and inert payloads, against a real Mosquitto.

A route's `rate_limit` dead-letters what a runaway publisher sends beyond it (counted, with a reason) while
other routes keep flowing; `max_payload_bytes` overrides the pipeline's limit per route. Payload and topic
text is never evaluated or formatted: it comes out exactly as it went in.
"""

from __future__ import annotations

import base64
import json
import time

from edge_agent.topics import output_topic

from .kit import wait_for
from .kit.config import write_config

TWO_ROUTES = [
    {"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"], "rate_limit": 5, "rate_burst": 5},
    {"topic": "plant/+/logs", "id_field": "id", "tasks": ["patterns"]},
]


def _by_topic(messages: list[dict], suffix: str) -> list[dict]:
    return [m for m in messages if m["source"]["topic"].endswith(suffix)]


def test_rate_limit_dead_letters_the_excess_and_other_routes_flow(tmp_path, broker, collect, publisher, run_agent):
    cfg = write_config(
        tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db", routes=TWO_ROUTES
    )
    out = collect(broker.port, "edge/results/#")
    dlq = collect(broker.port, "edge/deadletter")
    t_start = time.monotonic()  # before the agent exists, so before its bucket starts filling
    agent = run_agent(cfg)
    pub = publisher(broker.port)
    for i in range(200):
        pub.publish("plant/a/notes", json.dumps({"id": f"n{i}", "text": f"runaway P-{i}"}), wait=False)
        if i % 10 == 0:
            pub.publish("plant/a/logs", json.dumps({"id": f"l{i}", "text": f"log line {i}"}), wait=False)
    pub.publish("plant/a/logs", json.dumps({"id": "last", "text": "last log"}))

    def notes_accounted() -> int:
        return len(_by_topic(out.json(), "notes")) + len(_by_topic(dlq.json(), "notes"))

    assert wait_for(lambda: notes_accounted() >= 200 and len(_by_topic(out.json(), "logs")) >= 21, 60)
    elapsed = time.monotonic() - t_start
    ok, dead = _by_topic(out.json(), "notes"), _by_topic(dlq.json(), "notes")
    # Nothing lost: each runaway note came out as a result or a dead letter (a redelivery may repeat one).
    ids = [r["input_id"] for r in ok] + [json.loads(base64.b64decode(d["payload_b64"]))["id"] for d in dead]
    assert set(ids) == {f"n{i}" for i in range(200)}
    assert 5 <= len(ok) <= 5 + 5 * elapsed + 1, (len(ok), elapsed)
    assert {d["reason"] for d in dead} == {"rate limit: route plant/+/notes over 5 msg/s"}
    assert agent.agent.pipeline.over_limit["plant/+/notes"] == len(dead)
    # The unlimited route lost nothing to its neighbour's limit.
    assert sorted(r["input_id"] for r in _by_topic(out.json(), "logs")) == sorted(
        [f"l{i}" for i in range(0, 200, 10)] + ["last"]
    )
    assert not _by_topic(dlq.json(), "logs")


def test_route_payload_limit_overrides_the_pipeline_limit(tmp_path, broker, collect, publisher, run_agent):
    routes = [
        {"topic": "small", "max_payload_bytes": 100},
        {"topic": "default"},
        {"topic": "large", "max_payload_bytes": 5000},
    ]
    cfg = write_config(
        tmp_path / "c.toml",
        source_port=broker.port,
        sink_port=broker.port,
        outbox=tmp_path / "o.db",
        pipeline={"max_payload_bytes": 1000},
        routes=routes,
    )
    out = collect(broker.port, "edge/results/#")
    dlq = collect(broker.port, "edge/deadletter")
    run_agent(cfg)
    pub = publisher(broker.port)
    sent = {
        ("small", 500): "payload too large: 500 bytes, limit 100",
        ("default", 500): None,
        ("default", 2000): "payload too large: 2000 bytes, limit 1000",
        ("large", 2000): None,
    }
    for topic, size in sent:
        pub.publish(topic, "x" * size)
    assert wait_for(lambda: len(out.json()) + len(dlq.json()) >= len(sent), 30)
    got = {(r["source"]["topic"], len(r["text"])): None for r in out.json()}
    got |= {(d["source"]["topic"], len(base64.b64decode(d["payload_b64"]))): d["reason"] for d in dlq.json()}
    assert got == sent


NASTY_TOPICS = [
    "plant/{0.__class__}/notes",
    "plant/{gateway}/notes",
    "plant/{topic}/notes",
    "plant/%s%n/notes",
    "plant/{}/notes",
    "plant/ü日本🔥/notes",
]
NASTY_TEXTS = [
    "__import__('os').system('touch {sentinel}')",
    "{0.__class__.__init__.__globals__}",
    "%s%n%x%p",
    "${jndi:ldap://127.0.0.1/a}",
    "{{7*7}} {topic} {gateway}",
    "eval(compile('1', 'x', 'exec'))",
]


def test_payload_and_topic_text_is_inert(tmp_path, broker, collect, publisher, run_agent):
    sentinel = tmp_path / "pwned"
    routes = [{"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"],
               "review_topic": "edge/review/{gateway}/{topic}"}]
    cfg = write_config(
        tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db", routes=routes
    )
    out = collect(broker.port, "edge/results/#")
    run_agent(cfg)
    pub = publisher(broker.port)
    sent = {}
    for i, topic in enumerate(NASTY_TOPICS):
        for j, text in enumerate(NASTY_TEXTS):
            text = text.replace("{sentinel}", str(sentinel))
            sent[f"{i}.{j}"] = (topic, text)
            pub.publish(topic, json.dumps({"id": f"{i}.{j}", "text": text}))
        pub.publish(topic, NASTY_TEXTS[0].replace("{sentinel}", str(sentinel)))  # plain text too
    assert wait_for(lambda: len(out.json()) >= len(sent) + len(NASTY_TOPICS), 30)
    results = {r["input_id"]: r for r in out.json() if r["input_id"]}
    assert set(results) == set(sent)
    for rid, (topic, text) in sent.items():
        assert results[rid]["text"] == text and results[rid]["source"]["topic"] == topic
    topics = {t for t, _p, _r in out.messages}
    assert topics == {f"edge/results/{t}" for t in NASTY_TOPICS}  # each filled once, braces left as they came
    assert not sentinel.exists()


def test_output_topic_fills_placeholders_once() -> None:
    assert output_topic("edge/{gateway}/{topic}", "a/{gateway}/{topic}/b", "gw") == "edge/gw/a/{gateway}/{topic}/b"
    assert output_topic("x/{topic}", "{0.__class__}%s", "gw") == "x/{0.__class__}%s"
