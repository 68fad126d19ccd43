"""Hot reload (SIGHUP): the daemon as a subprocess against a real Mosquitto, notes streaming throughout.

What must hold across a reload: every input has exactly one result (nothing lost, nothing duplicated),
the new routes and task settings show in the results from one message on, and a bad or restart-only
change is logged with the field while the running config keeps serving.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.notify import Notifier

from .kit import REPO, wait_for
from .kit.agent import log_events
from .kit.broker import free_port
from .kit.config import write_config

MODEL = REPO / "models" / "minilm-l6"

ALARMS_ROUTE = {
    "topic": "plant/+/alarms",
    "id_field": "id",
    "output_topic": "edge/results/{topic}",
    "tasks": ["patterns"],
}


def classifier(threshold: float, labels: dict[str, str]) -> dict:
    """The `tasks` table: one classifier task, `kind`."""
    return {"kind": {"kind": "classifier", "model": MODEL, "threshold": threshold, "labels": labels}}


def routes(tasks: list[str], *extra: dict) -> list[dict]:
    notes = {"topic": "plant/+/notes", "id_field": "id", "output_topic": "edge/results/{topic}",
             "review_topic": "edge/review/{topic}", "tasks": tasks}
    return [notes, *extra]


def start_agent(spawn_agent, broker, cfg: Path, log: Path):
    """The daemon, once its source has subscribed (a note published before that has no subscriber)."""
    agent = spawn_agent(cfg, log)
    assert wait_for(lambda: "plant/+/notes" in broker.log(), 60), log.read_text()[-2000:]
    return agent


class Stream:
    """Publishes notes n0, n1, ... at a steady rate on its own thread until stopped."""

    def __init__(self, pub, topic: str, rate: float = 25.0) -> None:
        self.pub, self.topic, self.period = pub, topic, 1 / rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.pub.note(self.topic, self.sent, f"P-{100 + self.sent % 50} seal leaking at {self.sent % 9} bar")
            self.sent += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.sent


def exactly_once(results: list[dict], expected: set[str]) -> None:
    ids = [r["input_id"] for r in results]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicated results for {dupes[:10]}"
    assert set(ids) == expected, (
        f"missing {sorted(expected - set(ids))[:10]}, unexpected {sorted(set(ids) - expected)[:10]}"
    )


@pytest.mark.skipif(not (MODEL / "model.bin").exists(), reason="models/minilm-l6 not built (.ci/setup builds it)")
def test_reload_applies_route_threshold_and_labels_with_no_loss(tmp_path, broker, collect, publisher, spawn_agent):
    old_labels = {"leak": "fluid leaking from a seal or pipe", "vibration": "abnormal vibration or noise"}
    new_labels = {**old_labels, "electrical": "electrical fault, tripped breaker, wiring"}
    cfg_args = dict(source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db")
    cfg = write_config(
        tmp_path / "c.toml", **cfg_args, tasks=classifier(0.0, old_labels), routes=routes(["patterns", "kind"])
    )
    results = collect(broker.port, "edge/results/#")
    review = collect(broker.port, "edge/review/#")
    agent = start_agent(spawn_agent, broker, cfg, tmp_path / "agent.log")
    pub = publisher(broker.port)
    stream = Stream(pub, "plant/line1/notes")
    try:
        assert wait_for(lambda: len(results.json()) >= 30, 90), "the agent did not start serving"
        # New label, threshold 1.0 (every classifier result flagged for review), and a new route.
        write_config(
            cfg, **cfg_args, tasks=classifier(1.0, new_labels), routes=routes(["patterns", "kind"], ALARMS_ROUTE)
        )
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(review.json()) >= 20, 90), "no result with the new threshold after SIGHUP"
        assert wait_for(lambda: "plant/+/alarms" in broker.log(), 30), "the new route's filter was not subscribed"
        for i in range(10):
            pub.publish("plant/line2/alarms", json.dumps({"id": f"a{i}", "text": f"ALM-{200 + i} on M-{i}01"}))
    finally:
        sent = stream.stop()
    expected = {f"n{i}" for i in range(sent)} | {f"a{i}" for i in range(10)}
    wait_for(lambda: len(results.json()) + len(review.json()) >= len(expected), 60)
    assert agent.alive()
    everything = results.json() + review.json()
    exactly_once(everything, expected)

    notes = sorted((r for r in everything if r["input_id"].startswith("n")), key=lambda r: int(r["input_id"][1:]))
    new = [set(r["results"]["kind"]["scores"]) == set(new_labels) for r in notes]
    # One pipeline, FIFO: the swap happens between two batches, so old behaviour, then new, never mixed.
    switch = new.index(True)
    assert not any(new[:switch]) and all(new[switch:]), "old and new task sets interleaved"
    assert switch >= 30
    assert all(set(r["results"]["kind"]["scores"]) == set(old_labels) for r in notes[:switch])
    assert all(r["results"]["kind"]["review"] is False for r in notes[:switch])
    assert all(r["results"]["kind"]["review"] is True for r in notes[switch:])
    assert {r["input_id"] for r in review.json()} == {r["input_id"] for r in notes[switch:]}
    alarms = [r for r in everything if r["input_id"].startswith("a")]
    assert all(r["source"]["topic"] == "plant/line2/alarms" and "kind" not in r["results"] for r in alarms)
    assert alarms[0]["results"]["patterns"]["codes"], alarms[0]
    assert agent.kill(signal.SIGTERM) == 0


def test_invalid_config_rejected_and_old_config_keeps_serving(tmp_path, broker, collect, publisher, spawn_agent):
    cfg_args = dict(source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db")
    cfg = write_config(tmp_path / "c.toml", **cfg_args, routes=routes(["patterns"]))
    results = collect(broker.port, "edge/results/#")
    log = tmp_path / "agent.log"
    agent = start_agent(spawn_agent, broker, cfg, log)
    pub = publisher(broker.port)
    for i in range(5):
        pub.note("plant/line1/notes", i)
    assert wait_for(lambda: len(results.json()) >= 5, 60)

    # 1. A value out of range: rejected at validation, like `check-config` would.
    write_config(cfg, **cfg_args, routes=routes(["patterns"]), pipeline={"batch_max": 0})
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: log_events(log, "reload.rejected"), 30), log.read_text()[-2000:]
    first = log_events(log, "reload.rejected")[0]
    assert first["field"] == "pipeline.batch_max" and first["fix"] == "raise the value"

    # 2. Valid TOML and schema, but a model that cannot load: rejected before anything is swapped.
    missing = tmp_path / "no-such-model"
    write_config(cfg, **cfg_args, routes=routes(["kind"]),
                 tasks={"kind": {"kind": "tagger", "model": missing, "head": f"{missing}/head.npz"}})
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: len(log_events(log, "reload.rejected")) >= 2, 60), log.read_text()[-2000:]
    second = log_events(log, "reload.rejected")[1]
    assert second["field"] == "tasks.kind" and str(missing) in second["error"]

    for i in range(5, 15):
        pub.note("plant/line1/notes", i)
    assert wait_for(lambda: len(results.json()) >= 15, 60)
    exactly_once(results.json(), {f"n{i}" for i in range(15)})
    assert all(set(r["results"]) == {"patterns"} for r in results.json())
    assert agent.alive()
    assert agent.kill(signal.SIGTERM) == 0


def test_restart_only_change_is_logged_and_kept(tmp_path, broker, collect, publisher, spawn_agent):
    cfg_args = dict(source_port=broker.port, outbox=tmp_path / "o.db")
    cfg = write_config(tmp_path / "c.toml", **cfg_args, sink_port=broker.port, routes=routes(["patterns"]))
    results = collect(broker.port, "edge/results/#")
    log = tmp_path / "agent.log"
    agent = start_agent(spawn_agent, broker, cfg, log)
    pub = publisher(broker.port)
    pub.note("plant/line1/notes", 0)
    assert wait_for(lambda: len(results.json()) == 1, 60)

    # The sink port needs a restart; the route's task list does not: one is kept, the other applies.
    write_config(cfg, **cfg_args, sink_port=free_port(), routes=routes([]))
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: log_events(log, "reload.needs_restart"), 30), log.read_text()[-2000:]
    assert [e["field"] for e in log_events(log, "reload.needs_restart")] == ["sink.port"]
    pub.note("plant/line1/notes", 1)
    assert wait_for(lambda: len(results.json()) == 2, 60), "results stopped: the old sink port was not kept"
    by_id = {r["input_id"]: r for r in results.json()}
    assert set(by_id["n0"]["results"]) == {"patterns"} and by_id["n1"]["results"] == {}
    assert agent.kill(signal.SIGTERM) == 0


def test_reload_tells_systemd_reloading_then_ready(tmp_path, broker) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    cfg_args = dict(source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db")
    cfg_path = write_config(tmp_path / "c.toml", **cfg_args)
    agent = Agent(config.load(cfg_path, environ={}), Notifier(path))
    stop, reload = threading.Event(), threading.Event()
    t = threading.Thread(target=agent.run, args=(stop, reload, lambda: config.load(cfg_path, environ={})))
    t.start()
    try:
        # STATUS=waiting for the source broker... may come first: READY follows the first subscription.
        while not sock.recv(1024).decode().startswith("READY=1"):
            pass
        reload.set()
        fields = sock.recv(1024).decode().splitlines()
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=") and int(fields[1][15:]) > 0
        assert sock.recv(1024).decode().splitlines() == ["READY=1", "STATUS=running"]
        write_config(cfg_path, **cfg_args, pipeline={"batch_max": 0})
        reload.set()
        assert sock.recv(1024).decode().startswith("RELOADING=1")
        assert sock.recv(1024).decode().splitlines() == [
            "READY=1",
            "STATUS=running; last reload rejected: pipeline.batch_max",
        ]
    finally:
        stop.set()
        t.join(30)
        sock.close()
        agent.notifier.close()
    assert not t.is_alive()


def test_restart_only_changes_are_named_by_dotted_path() -> None:
    from edge_agent.agent import _restart_only_changes

    base = {"routes": [{"topic": "plant/+/notes"}]}
    old = config.parse(base, environ={})
    new = config.parse(
        {
            **base,
            "gateway_id": "gw-2",
            "sink": {"port": 8883, "tls": {"insecure": True}},
            "pipeline": {"batch_max": 10},  # live: not listed
            "tasks": {"t": {"kind": "patterns"}},  # live: not listed
        },
        environ={},
    )
    assert _restart_only_changes(old, new) == ["gateway_id", "sink.port", "sink.tls"]
    assert _restart_only_changes(old, old) == []
