"""Sparkplug B payloads → notes: each string metric named in a route's `text_metric` becomes one note.

Payloads are decoded with the official schema (Eclipse Tahu's sparkplug_b.proto, compiled into
sparkplug_b_pb2.py) on protobuf's C parser: about 10 µs for a payload of a few metrics here. The topic
names the sender: spBv1.0/<group>/<NDATA|DDATA|NBIRTH|DBIRTH>/<edge node>[/<device>].

A note's input id is `<group>/<edge node>[/<device>]/<metric>/<timestamp>`: the metric's own timestamp,
else the payload's, else the payload's seq. A value repeated in a BIRTH with its original timestamp keeps
its input id (not its result id, which also hashes the topic). Metrics sent by alias only (no name) are
not matched: resolving aliases needs the BIRTH, which a member of a share group may never have seen.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError as ProtobufError

from . import sparkplug_b_pb2 as spb
from .errors import DeadLetterKind as K
from .errors import DecodeError

NAMESPACE = "spBv1.0"


def _sender(topic: str) -> str:
    """`group/node[/device]` from a Sparkplug B topic, or DecodeError."""
    levels = topic.split("/")
    if levels[0] != NAMESPACE or len(levels) not in (4, 5):
        raise DecodeError(
            K.BAD_SPARKPLUG, f"not a Sparkplug B topic: {topic!r} (expected {NAMESPACE}/group/type/node[/device])"
        )
    return "/".join([levels[1], *levels[3:]])


def decode_sparkplug(
    payload: bytes, topic: str, text_metrics: tuple[str, ...], *, max_bytes: int
) -> list[tuple[str, str]]:
    """(text, input_id) for every non-empty string metric named in `text_metrics`, in payload order.

    An empty list is a valid Sparkplug payload without notes (most DDATA carry only measurements).
    """
    if len(payload) > max_bytes:
        raise DecodeError(K.TOO_LARGE, f"payload too large: {len(payload)} bytes, limit {max_bytes}")
    sender = _sender(topic)
    msg = spb.Payload()
    try:
        msg.ParseFromString(payload)
    except ProtobufError as e:
        raise DecodeError(K.BAD_SPARKPLUG, f"not a Sparkplug B payload: protobuf says {e}") from None
    if not msg.metrics and not msg.HasField("timestamp"):
        # Plain text or JSON can parse as unknown protobuf fields; every Sparkplug payload has a timestamp.
        raise DecodeError(K.BAD_SPARKPLUG, "not a Sparkplug B payload: no timestamp and no metrics")
    notes: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for m in msg.metrics:
        if m.name not in text_metrics or m.WhichOneof("value") != "string_value":
            continue
        if not isinstance(m.string_value, str):
            # protobuf's parser does not check a proto2 string for UTF-8: invalid bytes come back as bytes.
            raise DecodeError(K.INVALID_UTF8, f"Sparkplug B metric {m.name!r}: string value is not valid UTF-8")
        if not m.string_value.strip():
            continue
        when = m.timestamp or msg.timestamp or f"seq{msg.seq}"
        input_id = f"{sender}/{m.name}/{when}"
        seen[input_id] = n = seen.get(input_id, 0) + 1
        notes.append((m.string_value, input_id if n == 1 else f"{input_id}/{n}"))  # same metric twice in one payload
    return notes
