"""Unified Namespace topics: ISA-95 levels of the inbound topic and the note's asset fill the output
topics, and the latest result per asset is retained where a late subscriber finds it (real Mosquitto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.errors import ConfigError
from edge_agent.outbox.store import retained, split_retain
from edge_agent.topics import first_asset, output_topic, segments

from .kit import wait_for
from .kit.agent import Running
from .kit.broker import Broker
from .kit.clients import Collector
from .kit.config import write_config

SEGMENTS = ["enterprise", "site", "area", "line"]
UNS_ROUTE = {
    "topic": "acme/+/+/+/notes",
    "id_field": "id",
    "topic_segments": SEGMENTS,
    "output_topic": "uns/{enterprise}/{site}/{area}/{line}/notes/results",
    "retain_latest_topic": "uns/{site}/{area}/{line}/{asset}/latest",
    "tasks": ["patterns"],
}


def route(**kw: object) -> dict:
    return {"topic": "acme/+/+/+/notes", "topic_segments": SEGMENTS, **kw}


def test_templates_fill_named_levels_one_level_each() -> None:
    fields = {**segments(tuple(SEGMENTS), "acme/berlin/press/l1/notes"), "asset": "P-101"}
    assert output_topic("uns/{site}/{line}/{asset}/latest", "acme/berlin/press/l1/notes", "gw", fields) == (
        "uns/berlin/l1/P-101/latest"
    )
    # A value that is empty or would add levels or wildcards fills exactly one safe level.
    odd = {"site": "", "area": "a/b", "line": "+", "asset": "#"}
    assert output_topic("uns/{site}/{area}/{line}/{asset}", "t", "gw", odd) == "uns/_/a_b/_/_"
    assert output_topic("r/{gateway}/{topic}", "plant/x", "gw", {"site": "s"}) == "r/gw/plant/x"
    assert segments(("a", "b", "c"), "x/y") == {"a": "x", "b": "y", "c": ""}


def test_retain_mark_round_trips() -> None:
    assert split_retain(retained("uns/a/latest")) == ("uns/a/latest", True)
    assert split_retain("edge/results/x") == ("edge/results/x", False)


def test_first_asset_in_task_order() -> None:
    assert first_asset({"patterns": {"assets": [{"text": "P-101"}, {"text": "V-2"}]}}) == "P-101"
    tagged = {"tags": {"entities": [{"text": "seal", "type": "part"}, {"text": "pump 3", "type": "Asset"}]}}
    assert first_asset(tagged) == "pump 3"
    assert first_asset({"patterns": {"assets": []}, "cat": {"label": "leak"}}) is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"output_topic": "uns/{sight}/x"}, "routes.0.output_topic"),
        ({"output_topic": "uns/{asset}/x"}, "routes.0.output_topic"),  # {asset} is for the retained topic only
        ({"review_topic": "rev/{line"}, "routes.0.review_topic"),
        ({"retain_latest_topic": "uns/{site}/{nope}"}, "routes.0.retain_latest_topic"),
        ({"retain_latest_topic": "uns/+/{asset}"}, "routes.0.retain_latest_topic"),
        ({"topic_segments": ["a", "b", "c", "d", "e", "f"]}, "routes.0.topic_segments"),
        ({"topic_segments": ["site", "site"]}, "routes.0.topic_segments"),
        ({"topic_segments": ["topic"]}, "routes.0.topic_segments"),
    ],
)
def test_bad_templates_fail_at_load_naming_the_field(extra: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"routes": [route(**extra)]}, environ={})
    assert e.value.field == field


def test_latest_result_per_asset_is_retained_for_late_subscribers(tmp_path: Path, broker: Broker, collect, publisher):
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
                       routes=[UNS_ROUTE])
    out = collect(broker.port, "uns/#")
    agent = Running(cfg)
    try:
        pub = publisher(broker.port)
        notes = [
            ("acme/berlin/press/l1/notes", "n1", "P-101 seal leaking"),
            ("acme/berlin/press/l1/notes", "n2", "P-101 seal replaced, no leak"),  # newer: replaces n1
            ("acme/berlin/press/l1/notes", "n3", "HX-12 fouled"),
            ("acme/berlin/press/l1/notes", "n4", "shift handover, all quiet"),  # no asset: nothing retained
            ("acme//press/l2/notes", "n5", "V-204 stuck"),  # an empty site level
        ]
        for topic, nid, text in notes:
            pub.publish(topic, json.dumps({"id": nid, "text": text}))
            assert wait_for(lambda nid=nid: nid in {r["input_id"] for r in out.json("uns/acme/")}, 30)
        results = {(r := json.loads(p))["input_id"]: (t, r) for t, p, _ in out.messages if t.endswith("/results")}
        assert results["n1"][0] == "uns/acme/berlin/press/l1/notes/results"
        assert results["n5"][0] == "uns/acme/_/press/l2/notes/results"

        late = Collector(broker.port, "uns/+/+/+/+/latest", client_id="late-subscriber")
        try:
            assert wait_for(lambda: len([m for m in late.messages if m[2]]) >= 3, 30)
            wait_for(lambda: False, timeout=0.5)  # a fourth retained message would show up now
            kept = {t: json.loads(p) for t, p, keep in late.messages if keep}
        finally:
            late.close()
        assert {t: r["input_id"] for t, r in kept.items()} == {
            "uns/berlin/press/l1/P-101/latest": "n2",
            "uns/berlin/press/l1/HX-12/latest": "n3",
            "uns/_/press/l2/V-204/latest": "n5",
        }
        # The retained copy is the result itself: same id, so consumers de-duplicate it.
        assert kept["uns/berlin/press/l1/P-101/latest"]["id"] == results["n2"][1]["id"]
    finally:
        agent.stop()
