"""What the guarantees need from the brokers, pinned against real Mosquitto: the quickstart's source broker
(configs/mosquitto.conf) loses nothing where Mosquitto's defaults do, a route removed from the config stops
being delivered after a restart, and a retained note is processed once, not on every restart.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .kit import REPO, wait_for
from .kit.broker import MOSQUITTO, Broker
from .kit.config import write_config

BURST = 3000


def _source_broker(workdir: Path, ours: bool) -> Broker:
    """Mosquitto with only a listener (its defaults: max_queued_messages 1000, no persistence), or with the
    settings the quickstart ships in configs/mosquitto.conf."""
    b = Broker(workdir)
    conf = [f"listener {b.port} 127.0.0.1", "allow_anonymous true", f"log_dest file {b.dir}/mosquitto.log"]
    if ours:
        conf += [f"persistence_location {b.dir}/", (REPO / "configs" / "mosquitto.conf").read_text()]
    if os.geteuid() == 0:
        conf.append("user root")
    b.conf.write_text("\n".join(conf) + "\n")
    return b.start()


@pytest.mark.parametrize("ours", [False, True], ids=["mosquitto-defaults", "configs-mosquitto.conf"])
def test_notes_published_while_the_agent_restarts_survive_only_with_our_broker_settings(
    tmp_path, uplink, collect, publisher, run_agent, ours
) -> None:
    assert Path(MOSQUITTO).exists()
    src = _source_broker(tmp_path / "src", ours)
    try:
        cfg = write_config(tmp_path / "c.toml", source_port=src.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
        out = collect(uplink.port, "edge/results/#")
        run_agent(cfg).stop()  # the agent's persistent session now exists at the broker
        pub = publisher(src.port)
        for i in range(BURST):  # QoS 1, each PUBACKed by the broker: the producer did its part
            pub.note("plant/line1/notes", i)
        run_agent(cfg)
        expected = BURST if ours else 1000
        wait_for(lambda: len({r["input_id"] for r in out.json()}) >= expected, 60)
        wait_for(lambda: False, 2)  # then let anything still on its way arrive
        got = len({r["input_id"] for r in out.json()})
    finally:
        src.stop()
    print(f"{'ours' if ours else 'defaults'}: {got} of {BURST} notes got their result")
    if ours:
        assert got == BURST
    else:  # Mosquitto kept 1,000 for the offline session (plus what was in flight) and dropped the rest
        assert got < BURST - 1000, got


TWO_ROUTES = [
    {"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"]},
    {"topic": "plant/+/logs", "tasks": ["patterns"]},
]


def test_a_route_removed_from_the_config_is_unsubscribed_at_the_next_start(
    tmp_path, broker, uplink, collect, publisher, run_agent
) -> None:
    """The source session is persistent: before, the broker kept delivering a removed route's filter after a
    restart, and every message on it was dead-lettered ("no route matches"), restart after restart."""
    both = write_config(tmp_path / "both.toml", source_port=broker.port, sink_port=uplink.port,
                        outbox=tmp_path / "o.db", routes=TWO_ROUTES)  # fmt: skip
    one = write_config(tmp_path / "one.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
    out = collect(uplink.port, "edge/results/#")
    dlq = collect(uplink.port, "edge/deadletter")
    run_agent(both).stop()
    agent = run_agent(one)
    assert wait_for(lambda: agent.agent.source.subscribed.is_set(), 15)
    pub = publisher(broker.port)
    pub.publish("plant/line1/logs", b"kernel: eth0 link down")
    pub.note("plant/line1/notes", 1)
    assert wait_for(lambda: len(out.json()) >= 1, 20)
    wait_for(lambda: False, 1.5)  # a log line, if the broker still delivered it, would be here by now
    assert [r["input_id"] for r in out.json()] == ["n1"]
    assert dlq.json() == []
    agent.stop()
    agent = run_agent(one)  # and it stays so at every later start
    pub.publish("plant/line1/logs", b"kernel: eth0 link up")
    pub.note("plant/line1/notes", 2)
    assert wait_for(lambda: len(out.json()) >= 2, 20)
    wait_for(lambda: False, 1.5)
    assert dlq.json() == []


def test_a_retained_note_is_processed_once_not_at_every_restart(
    tmp_path, broker, uplink, collect, publisher, run_agent
) -> None:
    cfg = write_config(tmp_path / "c.toml", source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db")
    out = collect(uplink.port, "edge/results/#")
    pub = publisher(broker.port)
    info = pub.client.publish("plant/line1/notes", b'{"id": "r1", "text": "P-101 seal leaking"}', qos=1, retain=True)
    info.wait_for_publish(10)
    for _ in range(3):  # a first start, then two restarts of a resumed session
        agent = run_agent(cfg)
        assert wait_for(lambda: len(out.json()) >= 1, 20)
        wait_for(lambda: False, 1.5)  # a second copy, if the broker resent the retained note, arrives by now
        agent.stop()
    assert [r["input_id"] for r in out.json()] == ["r1"]
