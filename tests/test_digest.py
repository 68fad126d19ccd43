"""The shift handover digest: the pure logic on hand-made results, then a day's notes through a real broker.

Pure logic (no broker): grouping per asset, open/done, recurring problems, urgency first, out-of-range
measurements, grounding (a writer that invents an asset is not published), windows and ids. End to end: notes
through a real Mosquitto with the real patterns task and a zero-shot classifier, a digest on request, the
digests due while the daemon was down produced once at start, and none again after a restart.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.config import DigestConfig
from edge_agent.digest import Digester
from edge_agent.outbox.store import Outbox
from edge_agent.results import rfc3339
from edge_agent.tasks.patterns import extract

from .kit import wait_for
from .kit.config import write_config

T0 = datetime(2026, 12, 7, 6, 0, tzinfo=UTC).timestamp()


def result(i: int, text: str, minutes: float, *, urgency: str | None = None, status: str | None = None,
           action: str | None = None, symptom: str | None = None, topic: str = "plant/line1/notes") -> bytes:
    """A result payload as the pipeline publishes it (patterns, and optionally urgency/status/extract)."""
    results: dict = {"patterns": extract(text)}
    if urgency:
        results["urgency"] = {"label": urgency, "score": 0.9}
    if status:
        results["status"] = {"label": status, "score": 0.9}
    if action or symptom:
        fields = {"action": action and {"text": action}, "symptom": symptom and {"text": symptom}}
        results["extract"] = {"fields": fields, "ungrounded": []}
    return json.dumps({"schema": "edge-agent/result/1", "id": f"r{i}", "input_id": f"n{i}",
                       "source": {"topic": topic, "received_at": rfc3339(T0 + 60 * minutes)}, "text": text,
                       "results": results, "replayed": False}).encode()  # fmt: skip


SHIFT = [
    result(1, "P-101 seal leaking, discharge 4.5 bar", 10, urgency="medium", symptom="seal leaking"),
    result(2, "Conveyor C-12 belt slipping", 20, urgency="low", symptom="belt slipping"),
    result(3, "P-101 leaking again, motor temp 95 degC", 120, urgency="high", symptom="leaking again"),
    result(4, "C-12 tensioned belt, checked rollers", 150, action="tensioned belt"),
    result(5, "HX-12 fouled, alarm E-042", 200, urgency="medium", symptom="fouled"),
    result(6, "HX-12 cleaned", 300, status="done"),
    result(7, "shift handover, all quiet", 400),
]


def test_items_per_asset_open_done_recurring_and_urgency_first() -> None:
    cfg = DigestConfig(enabled=True, limits={"temperature": {"max": 90}})
    d = Digester(cfg, "gw-test")
    digest = d.build(SHIFT, T0, T0 + 8 * 3600)
    assert digest["schema"] == "edge-agent/digest/1" and digest["notes"] == 7
    items = {it["asset"] or it["line"]: it for it in digest["items"]}
    p101, c12, hx12 = items["P-101"], items["C-12"], items["HX-12"]
    assert (p101["status"], p101["recurring"], p101["urgency"], p101["note_ids"]) == ("open", True, "high",
                                                                                      ["n1", "n3"])  # fmt: skip
    assert (c12["status"], c12["recurring"], c12["note_ids"]) == ("done", False, ["n2", "n4"])
    assert "Done: tensioned belt." in c12["summary"]
    assert (hx12["status"], hx12["note_ids"]) == ("done", ["n5", "n6"])  # a classifier's "done" label
    assert "Reported 2 times" in p101["summary"] and "Still open." in p101["summary"]
    temp = next(m for m in p101["measurements"] if m["quantity"] == "temperature")
    assert temp["out_of_range"] is True and temp["note_id"] == "n3" and "95 degC is out of range" in p101["summary"]
    # Most urgent first; open before done at the same urgency.
    assert [it["asset"] for it in digest["items"][:3]] == ["P-101", "HX-12", "C-12"]
    assert digest["items"][-1]["asset"] is None and digest["items"][-1]["line"] == "plant/line1/notes"
    assert digest["ungrounded_dropped"] == 0
    for it in digest["items"]:  # every tag, code and measurement in a summary occurs in a cited note
        cited = " ".join(json.loads(p)["text"] for p in SHIFT if json.loads(p)["input_id"] in it["note_ids"])
        for key in ("assets", "codes", "measurements"):
            for found in extract(it["summary"])[key]:
                assert found["text"] in cited, (found, it["summary"])
    assert "P-101" in digest["text"] and digest["text"].index("P-101") < digest["text"].index("C-12")


def test_an_invented_asset_never_reaches_the_digest() -> None:
    def writer(items):  # a generator's prose: one grounded sentence, one with an asset no note names
        return [("P-101 leaked twice and is still open.", items[0]["note_ids"]),
                ("Pump P-999 was replaced at 7 bar.", items[0]["note_ids"])]

    d = Digester(DigestConfig(enabled=True), "gw-test", writer=writer)
    digest = d.build(SHIFT, T0, T0 + 8 * 3600)
    assert digest["text"] == "P-101 leaked twice and is still open."
    assert digest["ungrounded_dropped"] == 1 and d.ungrounded == 1
    assert "P-999" not in json.dumps(digest)


def test_windows_follow_the_local_schedule_and_ids_are_deterministic() -> None:
    d = Digester(DigestConfig(enabled=True, timezone="Europe/Berlin"), "gw-test")
    day = datetime(2026, 12, 7, tzinfo=UTC).timestamp()
    ends = d.shift_ends(day, day + 24 * 3600)
    # 06:00, 14:00, 22:00 in Berlin (UTC+1 in December) are 05:00, 13:00, 21:00 UTC.
    assert [datetime.fromtimestamp(t, UTC).hour for t in ends] == [5, 13, 21]
    assert d.previous_end(ends[1]) == ends[0]
    assert d.digest_id(ends[0], ends[1]) == Digester(DigestConfig(enabled=True), "gw-test").digest_id(ends[0], ends[1])
    assert d.digest_id(ends[0], ends[1]) != d.digest_id(ends[0], ends[1], "req-1")
    with pytest.raises(ValueError, match="HH:MM"):
        DigestConfig(schedule=("25:00",))


# -- end to end -------------------------------------------------------------------------------------------
MINILM = Path(__file__).resolve().parent.parent / "models" / "minilm-l6"
DIGEST = {"enabled": True, "schedule": ["06:00", "14:00", "22:00"]}
STATUS = {"kind": "classifier", "model": MINILM, "labels": {
    "done": "work completed: replaced, repaired, fixed, cleaned, tensioned, adjusted",
    "problem": "a fault: leaking, slipping, noise, vibration, alarm, fouled, failed"}}
ROUTE = {"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns", "status"]}
NOTES = ["P-101 seal leaking, discharge 4.5 bar", "Conveyor C-12 belt slipping", "P-101 leaking again at 5 bar",
         "C-12 belt tensioned and rollers replaced", "HX-12 fouled, alarm E-042", "HX-12 cleaned and repaired"]


def test_digests_through_a_real_broker_on_request_and_after_downtime(
    tmp_path, broker, uplink, collect, publisher, run_agent
) -> None:
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       routes=[ROUTE], digest=DIGEST, tasks={"status": STATUS})  # fmt: skip
    out = collect(uplink.port, "edge/results/#")
    digests = collect(uplink.port, "edge/digest/#")
    dlq = collect(uplink.port, "edge/deadletter")
    # The daemon was last up 30 hours ago: the digests that fell due meanwhile come out at start, once each.
    with Outbox(config.load(cfg, environ={}).outbox) as ob:
        ob.set_meta("digest.last_end", repr(time.time() - 30 * 3600))
    agent = run_agent(cfg)
    assert wait_for(lambda: len(digests.json()) >= 3, 30), digests.json()
    caught_up = digests.json()
    assert 3 <= len(caught_up) <= 4 and len({d["id"] for d in caught_up}) == len(caught_up)
    assert all(d["notes"] == 0 and d["items"] == [] for d in caught_up)  # no results were kept for those windows

    pub = publisher(broker.port)
    t_start = time.time() - 1
    for i, text in enumerate(NOTES):
        pub.note("plant/line1/notes", i, text)
    assert wait_for(lambda: len(out.json()) >= len(NOTES), 30)
    window = {"from": rfc3339(t_start), "to": rfc3339(time.time() + 1), "request_id": "req-7"}
    pub.publish("edge/digest/gw-test/request", json.dumps(window))
    pub.publish("edge/digest/gw-test/request", b'{"from": "yesterday"}')  # bad: a dead letter, nothing else
    assert wait_for(lambda: any(d.get("request_id") == "req-7" for d in digests.json()), 30), digests.json()
    answer = next(d for d in digests.json() if d.get("request_id") == "req-7")
    results = {r["input_id"]: r for r in out.json()}
    assert answer["notes"] == len(NOTES) and answer["from"] == window["from"]
    items = {it["asset"]: it for it in answer["items"]}
    assert set(items) == {"P-101", "C-12", "HX-12"}
    for it in items.values():
        cited = [results[i] for i in it["note_ids"]]
        assert all(it["asset"] in r["text"] for r in cited)
        # The status follows the published results: done iff the asset's last note was classified done.
        last = max(cited, key=lambda r: int(r["input_id"][1:]))  # published in order, on one connection
        assert it["status"] == ("done" if last["results"]["status"]["label"] == "done" else "open"), (it, last)
        for key in ("assets", "codes", "measurements"):
            for found in extract(it["summary"])[key]:
                assert any(found["text"] in r["text"] for r in cited)
    assert items["P-101"]["note_ids"] == ["n0", "n2"] and answer["ungrounded_dropped"] == 0
    assert wait_for(lambda: len(dlq.json()) == 1, 10)
    assert dlq.json()[0]["kind"] == "bad_request" and "digest request" in dlq.json()[0]["reason"]

    agent.stop()
    before = len(digests.json())
    run_agent(cfg)  # a restart: nothing due again
    wait_for(lambda: False, 2)
    assert len(digests.json()) == before
