"""Sparkplug B decoding: payloads per second through edge_agent.sparkplug.decode_sparkplug (parse, pick the
text metrics, build the input ids) against protobuf's bare ParseFromString of the same bytes (the floor:
the official compiled schema on protobuf's C parser, nothing else), in one process, same payload.

The payload is a DDATA of six metrics: one "Note" string and five doubles, as a device that sends a note
with its readings would. pysparkplug (0.6.1) is not the peer here: it pins paho-mqtt<2 and cannot be
installed beside edge-agent; measured in a venv of its own, its DData.decode took 55-100 µs per payload
where decode_sparkplug took 8-17 µs on the same loaded 2-core box.
"""

from __future__ import annotations

import os
import statistics
import time

TOPIC = "spBv1.0/plant1/DDATA/edge1/press3"


def _payload() -> bytes:
    from edge_agent import sparkplug_b_pb2 as spb

    p = spb.Payload(timestamp=1_800_000_000_000, seq=3)
    m = p.metrics.add(name="Note", datatype=12)
    m.string_value = "P-101 seal leaking at 4.5 bar, alarm E-042"
    for i in range(5):
        p.metrics.add(name=f"Temperature{i}", datatype=10).double_value = 81.5 + i
    return p.SerializeToString()


def _rate(fn, raw: bytes, n: int, rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn(raw)
        rates.append(round(n / (time.perf_counter() - t), 1))
    return rates


def run(quick: bool) -> list[dict]:
    from google.protobuf.internal import api_implementation

    from edge_agent import sparkplug_b_pb2 as spb
    from edge_agent.sparkplug import decode_sparkplug

    raw = _payload()
    n, rounds = (20_000, 3) if quick else (100_000, 5)
    assert decode_sparkplug(raw, TOPIC, ("Note",), max_bytes=1 << 20)[0][0].startswith("P-101")
    ours = _rate(lambda b: decode_sparkplug(b, TOPIC, ("Note",), max_bytes=1 << 20), raw, n, rounds)
    peer = _rate(lambda b: spb.Payload().ParseFromString(b), raw, n, rounds)
    return [{
        "name": "sparkplug_decode", "ours": statistics.median(ours), "peer": statistics.median(peer),
        "unit": "payloads/s", "peer_name": "protobuf Payload.ParseFromString alone (official schema, "
        f"{api_implementation.Type()} backend)", "payload_bytes": len(raw), "n": n,
        "stat": f"median of {rounds} rounds, one process", "samples_ours": ours, "samples_peer": peer,
        "ours_us_per_payload": round(1e6 / statistics.median(ours), 2), "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }]
