"""Horizontal scale: agents in one MQTT 5 shared-subscription group on a real Mosquitto split the stream,
and a member killed mid-stream loses nothing once it is back.

What Mosquitto 2.0.11 does with a dead member's share is pinned here too, with plain paho clients, because
the guarantee the README states depends on it.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import config
from edge_agent.errors import ConfigError

from .kit import wait_for
from .kit.agent import Running
from .kit.broker import Broker
from .kit.clients import Collector
from .kit.config import write_config

ROUTE = {"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"]}


# -- config -------------------------------------------------------------------------------------------


def test_share_group_subscribes_shared_filter() -> None:
    cfg = config.parse({"source": {"share_group": "edge", "client_id": "edge-a"}, "routes": [ROUTE]}, environ={})
    assert cfg.source.subscription("plant/+/notes") == "$share/edge/plant/+/notes"
    plain = config.parse({"routes": [ROUTE]}, environ={})
    assert plain.source.subscription("plant/+/notes") == "plant/+/notes"


def test_share_group_needs_own_client_id() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"source": {"share_group": "edge"}, "routes": [ROUTE]}, environ={})
    assert e.value.field == "source.client_id"
    assert "client_id" in e.value.hint


@pytest.mark.parametrize("group", ["a/b", "a+", "#", ""])
def test_share_group_name_is_one_topic_level(group: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"source": {"share_group": group, "client_id": "edge-a"}, "routes": [ROUTE]}, environ={})
    assert e.value.field == "source.share_group"


# -- what the broker does with a dead member's share ----------------------------------------------------


class Member:
    """A shared-subscription member that never acks (manual ack): its messages stay in flight."""

    def __init__(
        self, port: int, client_id: str, *, protocol: str, expiry: int, ack: bool, topic: str = "$share/g/t/#"
    ) -> None:
        self.got: list[str] = []
        self.subscribed = threading.Event()
        self._ack = ack
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        # The broker publishes the will when it notices the connection is gone: tests wait for it.
        self.client.will_set(f"will/{client_id}", b"gone", qos=1)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
            props.ReceiveMaximum = 10
            self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        else:
            self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.got.append(msg.payload.decode())
        if self._ack:
            c.ack(msg.mid, msg.qos)

    def crash(self) -> None:
        """Drop the TCP connection without DISCONNECT, as SIGKILL does."""
        self.client.loop_stop()
        sock = self.client.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize(("protocol", "expiry"), [("5", 3600), ("5", 0), ("3.1.1", 1)])
def test_mosquitto_keeps_a_dead_members_share_in_its_session(
    broker: Broker, publisher, protocol: str, expiry: int
) -> None:
    """Mosquitto 2.0.11 never hands a dead member's messages to the other members. With a persistent
    session (MQTT 5 session expiry, or 3.1.1 clean_session=false: $share works for 3.1.1 clients too) it
    holds them (the unacked ones, and its round-robin share of everything published while it is down)
    until that client id returns; without one (expiry 0) they are gone."""
    dead = Member(broker.port, "member-a", protocol=protocol, expiry=expiry, ack=False)
    live = Member(broker.port, "member-b", protocol=protocol, expiry=expiry, ack=True)
    pub = publisher(broker.port)
    for i in range(20):
        pub.publish("t/x", str(i))
    assert wait_for(lambda: len(dead.got) + len(live.got) >= 20)
    in_flight = set(dead.got)
    assert in_flight, "the round robin gave the first member nothing"
    wills = Collector(broker.port, "will/#")
    assert wills.subscribed.wait(10)
    dead.crash()
    # Publish on only once the broker has noticed the crash (its will is out): a message routed to the
    # member in between is in flight on a dead socket, held (persistent session) or gone (expiry 0).
    assert wait_for(lambda: bool(wills.messages), timeout=30)
    wills.close()
    for i in range(20, 60):
        pub.publish("t/x", str(i))
    # At least its half of the 40 (all of them when the dead session ended), then a chance for more.
    assert wait_for(lambda: len(live.got) >= 30)
    wait_for(lambda: False, timeout=1.0)
    assert not in_flight & set(live.got), "the broker redelivered the dead member's messages to another member"
    held = {str(i) for i in range(60)} - set(live.got)
    if expiry:
        assert in_flight < held, "messages published after the crash were not queued for the dead member"
    else:
        assert held == in_flight, "after the session ended, new messages should all go to the live member"

    back = Member(broker.port, "member-a", protocol=protocol, expiry=expiry, ack=True)
    try:
        if expiry:
            assert wait_for(lambda: set(back.got) >= held), "held messages did not come back with the session"
        else:
            wait_for(lambda: False, timeout=1.0)
            assert not back.got, "expected the share of a session that ended to be gone"
    finally:
        back.close()
        live.close()


def test_mosquitto_holds_no_more_than_max_queued_messages_for_a_dead_member(tmp_path: Path, publisher) -> None:
    """What a dead member's session holds is bounded by Mosquitto's max_queued_messages (default 1000):
    the rest of its share is dropped, lost to every member. Size it for the longest restart."""
    broker = Broker(tmp_path / "small-queue")
    broker.conf.write_text(broker.conf.read_text().replace("max_queued_messages 100000", "max_queued_messages 5"))
    broker.start()
    try:
        dead = Member(broker.port, "member-a", protocol="5", expiry=3600, ack=False)
        live = Member(broker.port, "member-b", protocol="5", expiry=3600, ack=True)
        pub = publisher(broker.port)
        for i in range(20):
            pub.publish("t/x", str(i))
        assert wait_for(lambda: len(dead.got) >= 10)  # its receive maximum: the rest of its share is queued
        dead.crash()
        for i in range(20, 60):
            pub.publish("t/x", str(i))
        back = Member(broker.port, "member-a", protocol="5", expiry=3600, ack=True)
        wait_for(lambda: False, timeout=1.5)
        lost = {str(i) for i in range(60)} - set(live.got) - set(dead.got) - set(back.got)
        assert len(set(back.got) - set(dead.got)) <= 5, "the session held more than max_queued_messages"
        assert lost, "nothing was dropped beyond max_queued_messages"
        back.close()
        live.close()
    finally:
        broker.stop()


# -- three agents, one group -----------------------------------------------------------------------------


def member_config(path: Path, *, port: int, member: str, outbox: Path, share_group: str | None = "edge") -> Path:
    """One member: the group's gateway id (so every member computes the same result ids), its own source
    client id, outbox and status topic; with share_group None, the same agent outside any group."""
    source = {"client_id": member} if share_group is None else {"share_group": share_group, "client_id": member}
    return write_config(path, source_port=port, sink_port=port, outbox=outbox, gateway_id="gw-scale",
                        source=source, sink={"replay_rate": 500, "status_topic": f"edge/status/{{gateway}}/{member}"},
                        log={"level": "info"},
                        routes=[{"topic": "plant/+/notes", "id_field": "id", "output_topic": "edge/results/{topic}",
                                 "tasks": ["patterns"]}])


def test_joining_a_group_drops_the_plain_subscription_of_an_old_session(tmp_path: Path, broker: Broker, publisher):
    """An agent that ran without a group left `plant/+/notes` in its persistent session; once it joins a
    group it must get its share only, not every message on top of it."""
    alone = member_config(tmp_path / "alone.toml", port=broker.port, member="edge-a", outbox=tmp_path / "a.db",
                          share_group=None)
    first = Running(alone)
    assert wait_for(lambda: "edge-a 1 plant/+/notes" in broker.log(), 30)
    first.stop()
    joined = Running(member_config(tmp_path / "m.toml", port=broker.port, member="edge-a", outbox=tmp_path / "a.db"))
    other = Member(broker.port, "other", protocol="5", expiry=0, ack=True, topic="$share/edge/plant/+/notes")
    try:
        assert wait_for(lambda: "edge-a 1 $share/edge/plant/+/notes" in broker.log(), 30)
        pub = publisher(broker.port)
        for i in range(20):
            pub.note("plant/line1/notes", i)
        assert wait_for(lambda: joined.agent.pipeline.processed + len(other.got) >= 20, 30)
        wait_for(lambda: False, timeout=1.0)  # a duplicate delivery would show up now
        assert joined.agent.pipeline.processed + len(other.got) == 20
        assert other.got, "the other member got no share"
    finally:
        other.close()
        joined.stop()


def handled(log: Path) -> Counter[str]:
    """Input ids an agent logged as processed (its canonical per-message line)."""
    ids: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if '"event": "message"' in line or '"event":"message"' in line:
            ids[json.loads(line)["input_id"]] += 1
    return ids


def test_three_agents_share_the_stream_and_a_killed_one_loses_nothing(
    tmp_path: Path, broker: Broker, collect, publisher, spawn_agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # the per-message log lines count each member's share
    names = ["edge-a", "edge-b", "edge-c"]
    cfgs = {n: member_config(tmp_path / f"{n}.toml", port=broker.port, member=n, outbox=tmp_path / f"{n}.db")
            for n in names}
    logs = {n: tmp_path / f"{n}.log" for n in names}
    agents = {n: spawn_agent(cfgs[n], logs[n]) for n in names}
    out = collect(broker.port, "edge/results/#")
    assert wait_for(lambda: broker.log().count("$share/edge/plant/+/notes") >= 3, 60), "members did not subscribe"
    pub = publisher(broker.port)

    def results() -> dict[str, set[str]]:
        by_input: dict[str, set[str]] = {}
        for r in out.json("edge/results/"):
            by_input.setdefault(r["input_id"], set()).add(r["id"])
        return by_input

    first = [f"n{i}" for i in range(150)]
    for i in range(150):
        pub.note("plant/line1/notes", i)
    assert wait_for(lambda: set(first) <= set(results()), 60)
    shares = {n: sum(handled(logs[n])[i] for i in first) for n in names}
    assert all(shares.values()), f"a member got no share: {shares}"
    assert sum(shares.values()) >= 150

    # Mid-stream: kill edge-a while notes keep coming, and keep sending after it is gone.
    sender = threading.Thread(target=lambda: [pub.note("plant/line2/notes", i) for i in range(150, 300)])
    sender.start()
    wait_for(lambda: len(results()) >= 200 or not sender.is_alive(), 60)
    agents["edge-a"].kill()
    sender.join(60)
    for i in range(300, 450):
        pub.note("plant/line3/notes", i)
    everything = {f"n{i}" for i in range(450)}

    # The other two drain what they were given; edge-a's share waits in its session on the broker.
    def settled() -> bool:
        n = len(results())
        return not wait_for(lambda: len(results()) != n, timeout=3.0)

    assert wait_for(settled, 90)
    held = everything - set(results())
    assert held, "nothing was held for the killed member (Mosquitto redelivered to the others?)"

    agents["edge-a"] = spawn_agent(cfgs["edge-a"], logs["edge-a"])
    assert wait_for(lambda: everything <= set(results()), 90), f"lost: {sorted(everything - set(results()))[:20]}"
    assert all(len(rids) == 1 for rids in results().values()), "a redelivered note got a different result id"
    # Each held note came back through edge-a: processed by the restarted member, or (committed before the
    # SIGKILL cut its log line off) replayed from edge-a's outbox, which marks it "replayed".
    replayed = {r["input_id"] for r in out.json("edge/results/") if r["replayed"]}
    assert held <= set(handled(logs["edge-a"])) | replayed, "held notes did not come back through the killed member"
