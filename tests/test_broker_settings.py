"""What the guarantees need from the brokers, pinned against real Mosquitto: the quickstart's source broker
(configs/mosquitto.conf) loses nothing where Mosquitto's defaults do, a route removed from the config stops
being delivered after a restart, and a retained note is processed once, not on every restart.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import test_e2e
from .conftest import MOSQUITTO, REPO, Broker, wait_for, write_config

run_agent = test_e2e.run_agent  # the fixture: an in-process Agent on a thread

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
