"""One message can never fail its batch: whatever one message raises becomes that message's dead letter.

The pipeline is the real one over a real outbox; where a test needs a task that raises on one note it uses a
small task object (pure pipeline logic). The property test pushes arbitrary payloads — huge integers, odd
floats, lone surrogates, NUL, deep nesting, Sparkplug B payloads with wrong types — through the real
pipeline with the real patterns task and demands that every message ends as a result or a dead letter and
that a good note sent after them always gets its result. The end-to-end tests reproduce the two poison
messages of issue 10 through a real Mosquitto.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import config
from edge_agent import sparkplug_b_pb2 as spb
from edge_agent.message import Inbound, Note
from edge_agent.outbox.store import Outbox
from edge_agent.pipeline import Pipeline
from edge_agent.results import result_id
from edge_agent.tasks.registry import build_tasks

from .kit import REPO, wait_for
from .kit.broker import Broker
from .kit.config import write_config, write_toml

HUGE = b'{"text": "P-101 leak", "counter": ' + b"1" * 5000 + b"}"
DDATA = "spBv1.0/plant1/DDATA/edge1/press3"


def sparkplug(*metrics: tuple[str, Any], ts: int = 1_800_000_000_000) -> bytes:
    """A Sparkplug B payload; a string that UTF-8 cannot encode (a lone surrogate) goes on the wire as the
    bytes a careless producer would send (surrogatepass), as protobuf itself refuses to serialise it."""
    p = spb.Payload(timestamp=ts, seq=1)
    raw: list[tuple[bytes, bytes]] = []
    for name, value in metrics:
        m = p.metrics.add()
        m.name = name
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                wire = value.encode("utf-8", "surrogatepass")
                marker = f"#{len(raw)}#".ljust(len(wire), "#")[: len(wire)] if len(wire) >= 3 else "#" * len(wire)
                raw.append((marker.encode(), wire))
                value = marker
            m.datatype, m.string_value = 12, value
        elif isinstance(value, bool):
            m.datatype, m.boolean_value = 11, value
        elif isinstance(value, int):
            m.datatype, m.long_value = 8, value % 2**64  # UInt64, as Sparkplug B stores every integer
        elif isinstance(value, float):
            m.datatype, m.double_value = 10, value
        elif isinstance(value, bytes):
            m.datatype, m.bytes_value = 17, value
    out = p.SerializeToString()
    for marker, wire in raw:
        out = out.replace(marker, wire, 1)
    return out


def bad_utf8_note() -> bytes:
    """A DDATA whose Note string metric holds invalid UTF-8 (protobuf's parser hands back bytes)."""
    raw = sparkplug(("Note", "@@@@"), ("Temperature", 81.5))
    assert raw.count(b"@@@@") == 1
    return raw.replace(b"@@@@", b"\xff\xfe\xc3(")


class Rig:
    """A real Pipeline over a real outbox: what one batch committed, and which inputs were acked."""

    ROUTES = (
        {"topic": "spBv1.0/#", "format": "sparkplug", "text_metric": "Note", "tasks": ["patterns"]},
        {"topic": "p/#", "id_field": "id", "tasks": ["patterns"]},
    )

    def __init__(self, root: Path, tasks: dict | None = None, routes: tuple[dict, ...] | list[dict] = ROUTES,
                 pipeline: dict | None = None, outbox: dict | None = None, task_tables: dict | None = None) -> None:
        cfg = {"outbox": {"path": root / "o.db", **(outbox or {})},
               "pipeline": {"max_json_depth": 16, **(pipeline or {})},
               "routes": list(routes)}
        if task_tables:
            cfg["tasks"] = task_tables
        self.cfg = config.load(write_toml(root / "c.toml", cfg), environ={})
        self.outbox = Outbox(self.cfg.outbox).open()
        self.acked: list[int] = []
        self.pipeline = Pipeline(self.cfg, tasks if tasks is not None else build_tasks(self.cfg), self.outbox,
                                 None, lambda item: self.acked.append(item.mid), lambda: None)  # fmt: skip

    def run(self, batch: list[Inbound]) -> list[dict]:
        self.acked.clear()
        self.pipeline.process(batch)
        assert sorted(self.acked) == sorted(i.mid for i in batch)  # the whole batch committed and acked
        rows = self.outbox.batch(100_000)
        self.outbox.accept([r.seq for r in rows])
        return [json.loads(r.payload, parse_constant=pytest.fail) for r in rows]

    def close(self) -> None:
        self.outbox.close()


def inbound(topic: str, payload: bytes, mid: int) -> Inbound:
    return Inbound(topic, payload, mid, 1, time.time())


def by_kind(records: list[dict]) -> tuple[list[dict], list[dict]]:
    results = [r for r in records if r["schema"] == "edge-agent/result/1"]
    dead = [r for r in records if r["schema"] == "edge-agent/deadletter/1"]
    return results, dead


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_a_5000_digit_integer_is_a_dead_letter_and_the_batch_goes_on(rig: Rig) -> None:
    batch = [inbound("p/a", HUGE, 1)] + [inbound("p/a", b'{"id": "n%d", "text": "P-10%d at 4 bar"}' % (i, i), i + 2)
                                         for i in range(5)]  # fmt: skip
    results, dead = by_kind(rig.run(batch))
    assert sorted(r["input_id"] for r in results) == [f"n{i}" for i in range(5)]
    assert [(d["kind"], d["reason"]) for d in dead] == [("invalid_json", "invalid JSON: an integer of 5000 digits, "
                                                                           "limit 4300")]  # fmt: skip
    assert base64.b64decode(dead[0]["payload_b64"]) == HUGE


def test_a_sparkplug_note_of_invalid_utf8_is_a_dead_letter_and_its_batch_mates_are_not_lost(rig: Rig) -> None:
    good = sparkplug(("Note", "P-101 seal leaking"))
    batch = [inbound(DDATA, bad_utf8_note(), 1), inbound(DDATA, good, 2), inbound("p/x", b"HX-12 fouled", 3)]
    results, dead = by_kind(rig.run(batch))
    assert sorted(r["text"] for r in results) == ["HX-12 fouled", "P-101 seal leaking"]
    assert [(d["kind"], d["reason"]) for d in dead] == [
        ("invalid_utf8", "Sparkplug B metric 'Note': string value is not valid UTF-8")
    ]


class Picky:
    """A task that raises on one particular note, returns NaN for another, and is fine with the rest."""

    name = "picky"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        self.calls.append(len(notes))
        if any("boom" in n.text for n in notes):
            raise TypeError("cannot handle " + notes[0].text + "\ud800")  # a lone surrogate in the message too
        return [{"score": math.nan if "nan" in n.text else len(n.text)} for n in notes]

    def close(self) -> None:
        pass


def test_a_task_that_raises_on_one_note_dead_letters_only_that_note(tmp_path: Path) -> None:
    picky = Picky()
    routes = [{"topic": "p/#", "id_field": "id", "tasks": ["patterns", "picky"]}]
    rig = Rig(tmp_path, routes=routes, task_tables={"picky": {"kind": "patterns"}})
    rig.pipeline.swap(rig.cfg, {**build_tasks(rig.cfg), "picky": picky})
    try:
        texts = ["P-1 ok", "P-2 boom", "P-3 ok", "P-4 nan", "P-5 ok"]
        batch = [inbound("p/a", json.dumps({"id": f"n{i}", "text": t}).encode(), i + 1) for i, t in enumerate(texts)]
        results, dead = by_kind(rig.run(batch))
    finally:
        rig.close()
    assert sorted(r["input_id"] for r in results) == ["n0", "n2", "n4"]
    assert all(r["results"]["picky"] == {"score": 6} and "patterns" in r["results"] for r in results)
    reasons = {json.loads(base64.b64decode(d["payload_b64"]))["id"]: (d["kind"], d["reason"]) for d in dead}
    assert reasons["n1"][0] == "task_failed"
    assert reasons["n1"][1].startswith("task 'picky': TypeError: cannot handle P-2 boom")
    assert reasons["n3"][0] == "bad_output" and "not JSON compliant" in reasons["n3"][1]
    assert picky.calls == [5, 1, 1, 1, 1, 1]  # the batch, then each note alone
    assert len({d["id"] for d in dead}) == 2


# -- the property ---------------------------------------------------------------------------------------
_any_char = st.characters(codec=None, exclude_categories=())  # control characters, NUL, lone surrogates
nasty_text = st.text(_any_char, max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), nasty_text,
    st.sampled_from(["\x00", "\ud800", "\udfff x", "P-101\x00leak", "1e999999", "-0.0"]),
)  # fmt: skip
_lists = st.lists(scalars, max_size=3)
json_values = scalars | _lists | st.dictionaries(nasty_text, scalars | _lists, max_size=3)


def _raw_json(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _big_number(digits: int, where: str) -> bytes:
    return f'{{"text": "P-101 leak", "{where}": {"7" * digits}}}'.encode()


json_payloads = st.one_of(
    st.fixed_dictionaries({"text": json_values}, optional={"id": json_values, "x": json_values}).map(_raw_json),
    st.fixed_dictionaries({"text": nasty_text}, optional={"id": json_values}).map(_raw_json),
    st.tuples(st.integers(min_value=4200, max_value=6000), st.sampled_from(["id", "counter"])).map(
        lambda t: _big_number(*t)),
    st.sampled_from([b'{"text": "x", "v": 1e999999}', b'{"text": "x", "v": -1e-999999}', b'{"text": NaN}',
                     b'{"text": "x", "id": 1.5e308}', b'{"text": "\\u0000"}', b'{"text": "a\\ud800b", "id": "\\udc00"}',
                     b'{"text": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\x00\x00", b"{\x00}"]),
    st.binary(max_size=120),
)  # fmt: skip
metric_values = st.one_of(nasty_text, st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(),
                          st.booleans(), st.binary(max_size=20))  # fmt: skip
sparkplug_payloads = st.one_of(
    st.lists(st.tuples(st.sampled_from(["Note", "Temperature", ""]), metric_values), max_size=4).map(
        lambda ms: sparkplug(*ms)),
    st.just(bad_utf8_note()),
    st.binary(max_size=60),
)  # fmt: skip
messages = st.one_of(
    st.tuples(st.just("p/x"), json_payloads),
    st.tuples(st.just(DDATA), sparkplug_payloads),
    st.tuples(st.sampled_from(["spBv1.0/bad", "nowhere/x"]), st.binary(max_size=20)),
)


@pytest.fixture(scope="module")
def prop_rig(tmp_path_factory: pytest.TempPathFactory):
    r = Rig(tmp_path_factory.mktemp("isolation"))
    yield r
    r.close()


@settings(derandomize=True, deadline=None, database=None, max_examples=1500,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(messages, min_size=1, max_size=6))
def test_every_message_ends_as_a_result_or_a_dead_letter_and_the_next_note_gets_its_result(
    prop_rig: Rig, msgs: list[tuple[str, bytes]]
) -> None:
    batch = [inbound(topic, payload, i + 1) for i, (topic, payload) in enumerate(msgs)]
    batch.append(inbound("p/good", b'{"id": "after", "text": "P-107 tripped at 90 degC"}', len(batch) + 1))
    records = prop_rig.run(batch)
    results, dead = by_kind(records)
    assert any(r["input_id"] == "after" and r["results"]["patterns"]["assets"] for r in results)
    dead_letters = set()  # sha256 of each payload dead-lettered (a long one's dead letter keeps only a prefix)
    for rec in dead:
        assert rec["kind"] and rec["reason"]
        kept = base64.b64decode(rec["payload_b64"])
        dead_letters.add(rec["payload_sha256"] if rec.get("truncated") else hashlib.sha256(kept).hexdigest())
    for item in batch:
        if hashlib.sha256(item.payload).hexdigest() in dead_letters:
            continue
        # Not dead-lettered: then it became results (one per note; a Sparkplug payload of no note is ignored).
        matching = [r for r in results if r["source"]["topic"] == item.topic]
        if item.topic == DDATA:
            continue  # ignored (no note) or results: both valid ends for a Sparkplug payload
        assert matching, item
    for r in results:
        r["text"].encode("utf-8")  # publishable


# -- end to end, real broker ----------------------------------------------------------------------------
def test_poison_messages_through_a_real_broker(tmp_path, broker, collect, publisher, run_agent) -> None:
    sparkplug_route, json_route = Rig.ROUTES
    routes = [sparkplug_route, {**json_route, "topic": "plant/+/notes"}]
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       routes=routes, pipeline={"batch_wait_ms": 200})  # fmt: skip
    out = collect(broker.port, "edge/results/#")
    dlq = collect(broker.port, "edge/deadletter")
    agent = run_agent(cfg)
    pub = publisher(broker.port)
    pub.publish("plant/line1/notes", HUGE, wait=False)
    for i in range(5):
        pub.note("plant/line1/notes", i)
    pub.publish(DDATA, bad_utf8_note(), wait=False)
    pub.publish(DDATA, sparkplug(("Note", "P-101 seal leaking")), wait=False)
    pub.publish("plant/line2/notes", b"HX-12 fouled")
    assert wait_for(lambda: len(out.json()) >= 7 and len(dlq.json()) >= 2, 30), (out.json(), dlq.json())
    assert sorted(r["input_id"] or r["text"] for r in out.json()) == sorted(
        [*(f"n{i}" for i in range(5)), "plant1/edge1/press3/Note/1800000000000", "HX-12 fouled"])
    assert sorted(d["kind"] for d in dlq.json()) == ["invalid_json", "invalid_utf8"]
    assert agent.agent.pipeline.processed == 9


# -- stop during a long model batch (issue 10, item 3) -----------------------------------------------------
GENERATOR = REPO / "models" / "smollm2-135m-instruct"


def test_a_batch_cut_short_by_stop_is_abandoned_uncommitted_and_redelivered(
    tmp_path, broker, collect, publisher, run_agent
) -> None:
    """SIGTERM while the generator runs a batch longer than drain_timeout_s: nothing of the batch is
    committed (no result made of a shutdown error, under a real result id), its inputs stay unacked, and
    the next session gets them again and publishes their real results."""
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       tasks={"extract": {"kind": "generator", "model": GENERATOR, "intra_threads": 1}},
                       routes=[{"topic": "plant/+/notes", "id_field": "id", "tasks": ["extract"]}],
                       pipeline={"batch_max": 16, "batch_wait_ms": 1500, "drain_timeout_s": 0.2})  # fmt: skip
    out = collect(broker.port, "edge/results/#")
    first = run_agent(cfg)
    pub = publisher(broker.port)
    notes = [f"Pump P-1{i:02d} seal leaking, replaced gasket" for i in range(16)]
    for i, text in enumerate(notes):
        pub.note("plant/line1/notes", i, text)
    pipeline = first.agent.pipeline
    assert wait_for(lambda: pipeline.busy, 30)
    time.sleep(0.5)  # well inside the 16-note generator batch (seconds on 2 cores)
    assert pipeline.busy and pipeline.processed == 0
    first.stop()
    with Outbox(first.agent.cfg.outbox) as ob:
        assert ob.stats().count == 0  # nothing of the batch was committed
    assert out.json() == []

    run_agent(cfg)  # the next session: the broker redelivers the 16 unacked notes
    assert wait_for(lambda: len({r["input_id"] for r in out.json()}) == 16, 180), len(out.json())
    results = out.json()
    assert all("error" not in r["results"]["extract"] for r in results), [r["results"] for r in results]
    assert sorted(r["input_id"] for r in results) == sorted({r["input_id"] for r in results})


# -- bounded records (issue 10, items 4 and 5) ---------------------------------------------------------
def test_a_dead_letter_keeps_a_bounded_prefix_with_length_and_sha256(rig: Rig) -> None:
    big = b"P-101 " * (2 * 1024 * 1024)  # 12 MiB, over the 256 KiB payload limit
    batch = [inbound("p/big", big, 1), inbound("p/ok", b"P-102 ok", 2)]
    rig.acked.clear()
    rig.pipeline.process(batch)
    rows = rig.outbox.batch(100)
    rig.outbox.accept([r.seq for r in rows])
    dead = next(json.loads(r.payload) for r in rows if r.topic == "edge/deadletter")
    assert dead["kind"] == "too_large" and dead["truncated"] is True
    assert dead["payload_bytes"] == len(big)
    assert dead["payload_sha256"] == hashlib.sha256(big).hexdigest()
    assert base64.b64decode(dead["payload_b64"]) == big[: 8 * 1024]
    assert max(len(r.payload) for r in rows) < 12 * 1024  # a 12 MiB message makes a row of ~11 KiB
    small = by_kind(rig.run([inbound("p/x", b'{"text": 1}', 3)]))[1][0]
    assert "truncated" not in small and base64.b64decode(small["payload_b64"]) == b'{"text": 1}'


def test_a_flood_of_rate_limited_messages_evicts_no_waiting_result(tmp_path: Path) -> None:
    """Before: 300 rate-limited 32 KiB messages evicted all 1,000 results waiting for the uplink of another
    route. Dead letters have their own bound (outbox.dead_letter_max_bytes) and evict only each other."""
    routes = [{"topic": "a/#", "tasks": ["patterns"]},
              {"topic": "b/#", "tasks": ["patterns"], "rate_limit": 1, "rate_burst": 1}]
    rig = Rig(tmp_path, routes=routes, outbox={"max_bytes": 1048576, "dead_letter_max_bytes": 524288})
    try:
        for k in range(10):  # 1,000 results wait (nobody accepts them: the uplink is down)
            rig.pipeline.process([inbound("a/x", b"P-%03d at 4 bar" % (100 * k + i), i + 1) for i in range(100)])
        for _ in range(10):
            rig.pipeline.process([inbound("b/x", b"x" * 32 * 1024, i + 1) for i in range(30)])
        s = rig.outbox.stats()
    finally:
        rig.close()
    # Every waiting result kept (and the one b/ message within its burst), though the dead letters' bytes were
    # several times their bound.
    assert s.count - s.dead_letters == 1000 + 1 and s.dropped_max_bytes == 0
    assert rig.pipeline.over_limit["b/#"] >= 290
    assert s.dead_letter_bytes <= 524288 and s.dropped_dead_letter_max_bytes == 300 - 1 - s.dead_letters


def test_results_are_bounded_per_list_and_in_size(tmp_path: Path) -> None:
    routes = [{"topic": "p/#", "tasks": ["patterns"]}]
    dense = " ".join(f"P-{100 + i % 900} at {i} bar, {i} degC" for i in range(8000)).encode()  # ~250 KiB
    (tmp_path / "a").mkdir()
    rig = Rig(tmp_path / "a", routes=routes, pipeline={"max_payload_bytes": 1048576, "max_result_bytes": 65536})
    try:
        records = rig.run([inbound("p/dense", dense, 1), inbound("p/small", b"P-101 at 4 bar, 80 degC", 2)])
    finally:
        rig.close()
    results, dead = by_kind(records)
    [small] = results
    assert "truncated" not in small["results"]["patterns"]
    [too_big] = dead  # the note itself is 250 KiB: over max_result_bytes even with its lists cut
    assert too_big["kind"] == "result_too_large"
    assert too_big["reason"].startswith("result of ") and "pipeline.max_result_bytes is 65536" in too_big["reason"]

    (tmp_path / "b").mkdir()
    rig = Rig(tmp_path / "b", routes=routes, pipeline={"max_payload_bytes": 1048576})  # default 1 MiB results
    try:
        [big] = by_kind(rig.run([inbound("p/dense", dense, 1)]))[0]
    finally:
        rig.close()
    pat = big["results"]["patterns"]
    assert pat["truncated"] is True
    assert len(pat["measurements"]) == 100 and len(pat["assets"]) == 100
    assert pat["measurements"][0]["text"] == "0 bar"
    assert len(json.dumps(big)) < 600 * 1024  # the 250 KiB text + 100 items per list (was ~5 MB)


def test_a_batch_closes_at_batch_max_bytes() -> None:
    import queue

    from edge_agent.config import parse

    cfg = parse({"routes": [{"topic": "p/#"}], "pipeline": {"batch_max_bytes": 3 * 1024 * 1024,
                                                          "batch_wait_ms": 0}}, {})  # fmt: skip
    q: queue.Queue = queue.Queue()
    for i in range(7):
        q.put(inbound("p/x", b"x" * (1024 * 1024), i + 1))
    pipeline = Pipeline(cfg, {}, None, q, lambda item: None, lambda: None)  # type: ignore[arg-type]
    sizes = [len(pipeline._take()) for _ in range(3)]
    assert sizes == [3, 3, 1]


# -- a result over the uplink's Maximum Packet Size (issue 10, item 6) --------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_result_over_the_uplinks_maximum_packet_size_becomes_a_small_dead_letter(
    tmp_path, broker, collect, publisher, run_agent, protocol
) -> None:
    """Mosquitto with max_packet_size 65536 disconnects a client that publishes more, and paho resends it on
    reconnect: before, the uplink was blocked for good. MQTT 5 reads the limit from CONNACK; for 3.1.1 the
    configured sink.max_packet_bytes applies."""
    up = Broker(tmp_path / "uplink")
    up.conf.write_text(up.conf.read_text() + "max_packet_size 65536\n")
    up.start()
    try:
        limit = {} if protocol == "5" else {"max_packet_bytes": 65536}
        routes = [{"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"], "max_payload_bytes": 200000}]
        cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=up.port, outbox=tmp_path / "o.db",
                           routes=routes, sink={"protocol": protocol, **limit})  # fmt: skip
        out = collect(up.port, "edge/results/#")
        dlq = collect(up.port, "edge/deadletter")
        agent = run_agent(cfg)
        pub = publisher(broker.port)
        pub.note("plant/line1/notes", 0, "P-101 " + "x" * 100_000)
        for i in range(1, 51):
            pub.note("plant/line1/notes", i)
        assert wait_for(lambda: len(out.json()) >= 50 and len(dlq.json()) >= 1, 30), (len(out.json()), dlq.json())
        assert sorted(r["input_id"] for r in out.json()) == sorted(f"n{i}" for i in range(1, 51))
        [dead] = dlq.json()
        assert dead["kind"] == "packet_too_large" and "over the uplink's Maximum Packet Size of 65536" in dead["reason"]
        assert dead["truncated"] is True and dead["payload_bytes"] > 100_000 and dead["payload_b64"] == ""
        sink = agent.agent.sink
        assert sink.oversized == 1 and sink.reconnects == 0
        topic = "plant/line1/notes"
        assert dead["reason"].split()[1] == result_id("gw-test", topic, "edge/results/" + topic, "n0", b"")
    finally:
        up.stop()


# -- a route that reads its own output (issue 10, item 4) ----------------------------------------------------
@pytest.mark.parametrize(
    ("routes", "extra", "what"),
    [
        ('topic = "#"', "", "output_topic 'edge/results/{topic}'"),
        ('topic = "plant/#"\noutput_topic = "plant/results/{topic}"', "", "output_topic"),
        ('topic = "edge/+"', "", "dead_letter_topic 'edge/deadletter'"),
        ('topic = "edge/status/+"', "", "sink.status_topic"),
        ('topic = "plant/#"\nreview_topic = "plant/review/{topic}"', "", "review_topic"),
    ],
)
def test_check_config_refuses_a_route_that_matches_its_own_output_on_the_same_broker(
    tmp_path: Path, routes: str, extra: str, what: str
) -> None:
    import subprocess
    import sys

    p = tmp_path / "c.toml"
    p.write_text(f"[source]\nport = 1883\n[sink]\nport = 1883\n{extra}[[routes]]\n{routes}\n")
    r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(p)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "routes.0.topic" in r.stderr and what in r.stderr and "forever" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # The same route reading from another broker than the one it publishes to is fine (nothing loops).
    p.write_text(f"[source]\nport = 1883\n[sink]\nport = 1884\n{extra}[[routes]]\n{routes}\n")
    r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(p)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_a_chain_of_routes_on_one_broker_is_allowed() -> None:
    cfg = config.parse({"routes": [{"topic": "plant/+/notes"}, {"topic": "edge/results/plant/#",
                                                                 "output_topic": "final/{topic}"}]}, {})  # fmt: skip
    assert len(cfg.routes) == 2
