"""Sparkplug B: string metrics named in `text_metric` become notes; payloads are built with the official
schema (Eclipse Tahu's sparkplug_b.proto, compiled) and sent through a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent import sparkplug_b_pb2 as spb
from edge_agent.errors import DecodeError
from edge_agent.sparkplug import decode_sparkplug

from .kit import wait_for
from .kit.agent import Running
from .kit.broker import Broker
from .kit.config import write_config

STRING, DOUBLE = 12, 10  # Sparkplug B DataType values
DDATA = "spBv1.0/plant1/DDATA/edge1/press3"


def payload(*metrics: tuple[str, object], ts: int = 1_800_000_000_000, seq: int = 7, metric_ts: int = 0) -> bytes:
    p = spb.Payload(timestamp=ts, seq=seq)
    for name, value in metrics:
        m = p.metrics.add()
        m.name = name
        if metric_ts:
            m.timestamp = metric_ts
        if isinstance(value, str):
            m.datatype, m.string_value = STRING, value
        else:
            m.datatype, m.double_value = DOUBLE, float(value)  # type: ignore[arg-type]
    return p.SerializeToString()


def test_each_named_string_metric_is_a_note() -> None:
    raw = payload(("Temperature", 81.5), ("Note", "P-101 seal leaking"), ("Operator", "kim"), ("Note", "E-042 again"))
    assert decode_sparkplug(raw, DDATA, ("Note",), max_bytes=1 << 20) == [
        ("P-101 seal leaking", "plant1/edge1/press3/Note/1800000000000"),
        ("E-042 again", "plant1/edge1/press3/Note/1800000000000/2"),
    ]
    both = decode_sparkplug(raw, DDATA, ("Note", "Operator"), max_bytes=1 << 20)
    assert [t for t, _ in both] == ["P-101 seal leaking", "kim", "E-042 again"]


def test_node_level_ids_and_metric_timestamps() -> None:
    raw = payload(("Note", "HX-12 fouled"), metric_ts=1_800_000_000_123)
    assert decode_sparkplug(raw, "spBv1.0/plant1/NDATA/edge1", ("Note",), max_bytes=1 << 20) == [
        ("HX-12 fouled", "plant1/edge1/Note/1800000000123")
    ]


def test_a_note_repeated_in_a_birth_keeps_its_id() -> None:
    """A DBIRTH re-sends current values with their own timestamps: the note keeps its input id."""
    data = payload(("Note", "P-101 seal leaking"), metric_ts=1_800_000_000_500, seq=4)
    birth = payload(("Note", "P-101 seal leaking"), ("Temperature", 80.0), metric_ts=1_800_000_000_500, seq=0,
                    ts=1_800_000_009_000)
    [(_, data_id)] = decode_sparkplug(data, DDATA, ("Note",), max_bytes=1 << 20)
    [(_, birth_id)] = decode_sparkplug(birth, DDATA.replace("DDATA", "DBIRTH"), ("Note",), max_bytes=1 << 20)
    assert data_id == birth_id == "plant1/edge1/press3/Note/1800000000500"


def test_no_note_in_a_payload_is_not_an_error() -> None:
    assert decode_sparkplug(payload(("Temperature", 81.5), ("Note", "  ")), DDATA, ("Note",), max_bytes=1 << 20) == []
    # A numeric metric that happens to carry the name is not text.
    assert decode_sparkplug(payload(("Note", 3.0)), DDATA, ("Note",), max_bytes=1 << 20) == []


@pytest.mark.parametrize(
    ("raw", "topic", "reason"),
    [
        (b'{"text": "P-101 leaking"}', DDATA, "not a Sparkplug B payload"),
        (b"P-101 leaking", DDATA, "not a Sparkplug B payload"),
        (b"\xff\xff\xff\xff", DDATA, "not a Sparkplug B payload"),
        (b"", DDATA, "not a Sparkplug B payload"),
        (payload(("Note", "x")), "plant/line1/notes", "not a Sparkplug B topic"),
        (b"x" * 100, DDATA, "payload too large"),
    ],
)
def test_what_is_not_sparkplug_is_rejected_with_a_reason(raw: bytes, topic: str, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode_sparkplug(raw, topic, ("Note",), max_bytes=64)
    assert e.value.reason.startswith(reason)


ROUTE = {
    "topic": "spBv1.0/+/DDATA/+/+",
    "format": "sparkplug",
    "text_metric": "Note",
    "output_topic": "edge/results/{topic}",
    "tasks": ["patterns"],
}


def test_sparkplug_notes_end_to_end(tmp_path: Path, broker: Broker, collect, publisher) -> None:
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       routes=[ROUTE])
    out = collect(broker.port, "edge/#")
    agent = Running(cfg)
    try:
        pub = publisher(broker.port)
        # Measurements only, alone in its batch: ignored and acked, and the pipeline goes on.
        pub.publish(DDATA, payload(("Temperature", 82.0), seq=2, ts=1_800_000_001_000))
        assert wait_for(lambda: agent.agent.pipeline.ignored == 1, 30)
        pub.publish(DDATA, payload(("Temperature", 81.5), ("Note", "P-101 seal leaking at 4.5 bar"), seq=1))
        pub.publish(DDATA, b'{"text": "not protobuf"}')
        assert wait_for(lambda: len(out.json("edge/results/")) >= 1 and len(out.json("edge/deadletter")) >= 1, 30)
        assert wait_for(lambda: agent.agent.pipeline.ignored == 1, 30)
        [result] = out.json("edge/results/")
        assert result["input_id"] == "plant1/edge1/press3/Note/1800000000000"
        assert result["text"] == "P-101 seal leaking at 4.5 bar"
        assert result["source"]["topic"] == DDATA
        assert result["results"]["patterns"]["assets"][0]["text"] == "P-101"
        [dead] = out.json("edge/deadletter")
        assert dead["reason"].startswith("not a Sparkplug B payload")
    finally:
        agent.stop()
