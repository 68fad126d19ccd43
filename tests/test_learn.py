"""A classifier that learns from corrections on the gateway: real daemon, real Mosquitto, int8 MiniLM.

It starts zero-shot with label descriptions that say nothing ("category one", "category two"), so it labels
leaks and vibration no better than chance. Corrections for notes it never scores arrive on the feedback
topic; after `retrain_every` of them the pipeline fits a new head, judges it against the live one on
held-out corrections, swaps it in, and held-out notes come out labelled right, with `head_version`. The
version survives a restart, and `edge-agent classifier rollback` goes back to the previous one.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from .kit import REPO, wait_for
from .kit.config import write_config

MINILM = REPO / "models" / "minilm-l6"
ASSETS = ["P-101", "P-204", "V-17", "HX-3", "K-12", "M-33", "C-12", "F-8"]
LEAK = ["seal leaking", "oil leak under the gearbox", "dripping from the flange", "hose burst, fluid on floor",
        "gasket weeping", "valve passing, water on the skid", "pinhole leak on the line", "air leak at fitting"]
SHAKE = ["high vibration", "rattling at speed", "knocking noise from bearing", "shaking on startup",
         "loud humming and vibration", "bearing noise, vibration 7 mm/s", "wobbles when loaded", "grinding noise"]
CORRECTIONS = [(f"{a} {s}", lab) for (a, (s, lab)) in zip(itertools.cycle(ASSETS),
               [(s, "A") for s in LEAK] + [(s, "B") for s in SHAKE], strict=False)]  # fmt: skip
CORRECTIONS += [(f"{s} on {a}", lab) for a, (s, lab) in zip(reversed(ASSETS * 2), [(s, "A") for s in LEAK] +
                [(s, "B") for s in SHAKE], strict=False)]  # fmt: skip
HELD = [("pump P-300 leaking at the seal", "A"), ("leak from the flange of V-40", "A"), ("oil leaking from K-77", "A"),
        ("water dripping under HX-9", "A"), ("fan F-2 vibrating badly", "B"), ("motor M-9 noisy, vibration", "B"),
        ("bearing knocking on C-40", "B"), ("P-55 shaking and rattling", "B")]  # fmt: skip
KIND = {"kind": "classifier", "model": MINILM, "labels": {"A": "category one", "B": "category two"},
        "learn": True, "retrain_every": 10, "holdout": 0.25}


def _accuracy(results: list[dict], truth: dict[str, str]) -> float:
    return sum(r["results"]["kind"]["label"] == truth[r["text"]] for r in results) / len(truth)


def test_corrections_retrain_the_head_on_the_gateway(tmp_path, broker, uplink, collect, publisher, run_agent):
    route = {"topic": "plant/+/notes", "tasks": ["kind"]}
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db",
                       routes=[route], feedback={"enabled": True}, tasks={"kind": KIND})  # fmt: skip
    out = collect(uplink.port, "edge/results/#")
    agent = run_agent(cfg)
    pub = publisher(broker.port)
    truth = dict(HELD)
    for text, _ in HELD:
        pub.publish("plant/l1/notes", text)
    assert wait_for(lambda: len(out.json()) == len(HELD), 30)
    before = _accuracy(out.json(), truth)
    assert all("head_version" not in r["results"]["kind"] for r in out.json())

    for text, label in CORRECTIONS:
        pub.publish("edge/feedback/gw-test", json.dumps({"text": text, "task": "kind", "label": label}))
    learner = agent.agent.learners["kind"]
    n = len(CORRECTIONS)
    pipeline = agent.agent.pipeline
    assert wait_for(lambda: pipeline.corrections["kind"] == n, 60)
    assert wait_for(lambda: not pipeline.busy, 60)  # a retrain runs in the pipeline, after its batch's commit
    assert learner.swaps >= 1, (learner.retrains, learner.rejections)
    version = agent.agent.tasks["kind"].head_version
    out.messages.clear()
    for text, _ in HELD:
        pub.publish("plant/l1/notes", text + " again")  # new notes (new ids), same meaning
    truth = {t + " again": lab for t, lab in HELD}
    assert wait_for(lambda: len(out.json()) == len(HELD), 30)
    after = _accuracy(out.json(), truth)
    print(f"held-out accuracy: zero-shot {before:.2f}, after {len(CORRECTIONS)} corrections {after:.2f} "
          f"(retrains {learner.retrains}, swaps {learner.swaps}, rejections {learner.rejections})")
    assert after >= 0.85 and after > before
    assert {r["results"]["kind"]["head_version"] for r in out.json()} == {version}
    agent.stop()

    expect = version - 1 or None  # rollback goes to the version before; past v1, back to zero-shot
    r = subprocess.run([sys.executable, "-m", "edge_agent", "classifier", "rollback", "--config", str(cfg),
                        "--task", "kind"], capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr
    again = run_agent(cfg)
    assert again.agent.tasks["kind"].head_version == expect
    assert (Path(tmp_path) / "heads" / f"kind-v{version}.npz").exists()


def test_learning_metrics_read_the_pipeline_and_learners() -> None:
    from collections import Counter, deque
    from types import SimpleNamespace

    from edge_agent.metrics import Metrics

    m = Metrics()
    learner = SimpleNamespace(agreement=deque([True, False, True, True]), swaps=2, rejections=1)
    pipeline = SimpleNamespace(corrections=Counter(kind=32))
    m.watch_learning(SimpleNamespace(pipeline=pipeline, learners={"kind": learner}))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect() for s in f.samples}
    assert got[("edge_agent_corrections_total", (("task", "kind"),))] == 32
    assert got[("edge_agent_live_agreement", (("task", "kind"),))] == 0.75
    assert got[("edge_agent_retrains_total", (("outcome", "swapped"), ("task", "kind")))] == 2
    assert got[("edge_agent_retrains_total", (("outcome", "rejected"), ("task", "kind")))] == 1
