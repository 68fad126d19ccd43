"""Corrections on the feedback topic: validated, stored durably with the batch, exported for training.

The parsing rules on plain task objects (pure logic), then the real daemon against a real Mosquitto with a
zero-shot classifier on the int8 MiniLM: corrections by result id and by text, bad ones dead-lettered with
the reason, and `edge-agent feedback export|stats` reading them back after a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from edge_agent.errors import DecodeError
from edge_agent.feedback import parse

from .kit import REPO, wait_for
from .kit.config import write_config


class Classifier:
    labels: ClassVar = ["leak", "vibration"]


class Extractor:
    fields: ClassVar = {"asset": "the equipment", "action": "what was done"}


TASKS = {"category": Classifier(), "extract": Extractor()}
STORED = json.dumps({"id": "r1", "text": "P-101 seal leaking", "results": {
    "category": {"label": "vibration"}, "extract": {"fields": {"asset": {"text": "P-101"}, "action": None}}}}).encode()


def _parse(obj: dict, new_labels: bool = False):
    return parse(json.dumps(obj).encode(), TASKS, lambda task: new_labels, {"r1": STORED}.get)


def test_valid_corrections() -> None:
    c = _parse({"result_id": "r1", "task": "category", "label": "leak"})
    assert (c.text, c.label, c.agreed) == ("P-101 seal leaking", "leak", False)  # the live head said vibration
    c = _parse({"text": "pump rattles", "task": "category", "label": "vibration"})
    assert (c.text, c.label, c.result_id, c.agreed) == ("pump rattles", "vibration", None, None)
    c = _parse({"result_id": "r1", "task": "extract", "fields": {"asset": "P-101"}})
    assert (c.fields, c.agreed) == ({"asset": "P-101"}, True)
    assert _parse({"text": "x", "task": "category", "label": "corrosion"}, new_labels=True).label == "corrosion"


@pytest.mark.parametrize(("obj", "reason"), [
    ({"result_id": "r1", "task": "nope", "label": "leak"}, "unknown task 'nope'"),
    ({"result_id": "r9", "task": "category", "label": "leak"}, "unknown result id 'r9'"),
    ({"result_id": "r1", "task": "category", "label": "corrosion"}, "label 'corrosion' is not one of"),
    ({"result_id": "r1", "task": "extract", "fields": {"asset": "P-999"}}, "must be text that occurs in the note"),
    ({"result_id": "r1", "task": "extract", "fields": {"colour": "red"}}, "has no field 'colour'"),
    ({"result_id": "r1", "task": "extract", "label": "leak"}, "gives no labels"),
    ({"task": "category", "label": "leak"}, "give 'result_id'"),
    ({"result_id": "r1", "task": "category"}, "give 'label'"),
])  # fmt: skip
def test_bad_corrections_name_the_reason(obj: dict, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        _parse(obj)
    assert e.value.kind == "bad_feedback" and reason in e.value.reason, e.value.reason


MINILM = Path(__file__).resolve().parent.parent / "models" / "minilm-l6"
CATEGORY = {"kind": "classifier", "model": MINILM, "labels": {
    "leak": "fluid or air leaking from a seal, pipe or valve", "vibration": "abnormal vibration, noise or rattle"}}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)  # fmt: skip


def test_corrections_through_a_real_broker_are_stored_and_exported(
    tmp_path, broker, uplink, collect, publisher, run_agent
) -> None:
    route = {"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns", "category"]}
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       routes=[route], feedback={"enabled": True}, tasks={"category": CATEGORY})  # fmt: skip
    out = collect(uplink.port, "edge/results/#")
    dlq = collect(uplink.port, "edge/deadletter")
    agent = run_agent(cfg)
    pub = publisher(broker.port)
    pub.note("plant/line1/notes", 1, "P-101 seal leaking at the flange")
    assert wait_for(lambda: len(out.json()) == 1, 30)
    [res] = out.json()
    live = res["results"]["category"]["label"]
    topic = "edge/feedback/gw-test"
    pub.publish(topic, json.dumps({"result_id": res["id"], "task": "category", "label": "leak"}))
    pub.publish(topic, json.dumps({"text": "bearing knocks at high speed", "task": "category", "label": "vibration"}))
    pub.publish(topic, json.dumps({"result_id": "0" * 32, "task": "category", "label": "leak"}))
    pub.publish(topic, json.dumps({"result_id": res["id"], "task": "category", "label": "corrosion"}))
    assert wait_for(lambda: agent.agent.pipeline.corrections["category"] == 2 and len(dlq.json()) == 2, 30)
    assert sorted(d["kind"] for d in dlq.json()) == ["bad_feedback", "bad_feedback"]
    assert any("unknown result id" in d["reason"] for d in dlq.json())
    assert any("'corrosion' is not one of" in d["reason"] for d in dlq.json())
    agent.stop()

    r = _cli("feedback", "export", "--config", str(cfg))  # read back from the file, the daemon stopped
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["text"], x["label"]) for x in rows] == [("P-101 seal leaking at the flange", "leak"),
                                                       ("bearing knocks at high speed", "vibration")]  # fmt: skip
    assert rows[0]["result_id"] == res["id"] and rows[0]["agreed"] is (live == "leak") and rows[1]["agreed"] is None
    r = _cli("feedback", "stats", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"]["category"]["labels"] == {"leak": 1, "vibration": 1}
