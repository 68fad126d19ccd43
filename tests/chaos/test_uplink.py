"""Uplink faults between the agent's sink and the uplink broker, made by the FaultProxy."""

from __future__ import annotations

import random
import time

import pytest

from ..kit import wait_for
from .harness import TIMEOUT_S, seconds

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT_S)]


def test_uplink_blackholed_60s_then_healed(rig):
    """A silent uplink (no RST, no FIN) for 60 s: only the sink's keepalive (5 s) can notice it. Results
    keep being committed meanwhile, and go out as a replayed backlog after the heal."""
    rig.start_agent()
    feeder = rig.feed("bh")
    assert rig.wait_results(100)
    disconnects, accepted = rig.count("sink.disconnected"), rig.proxy.accepted
    rig.proxy.blackhole()
    t0 = time.monotonic()
    # Noticed within 2x keepalive (a PINGREQ, then no reply), plus slack for a loaded machine.
    assert wait_for(lambda: rig.count("sink.disconnected") > disconnects, 30, 0.2), "the sink never noticed"
    noticed_s = time.monotonic() - t0
    # It keeps trying: new connections into the hole, each abandoned when no CONNACK comes.
    assert wait_for(lambda: rig.proxy.accepted > accepted, 30, 0.2)
    time.sleep(max(0.0, seconds(60) - (time.monotonic() - t0)))
    during = len(feeder.sent)
    retries = rig.proxy.accepted - accepted
    rig.proxy.heal()
    time.sleep(5)
    v = rig.finish("uplink blackhole 60 s", feeder, extra={"noticed_after_s": round(noticed_s, 1),
                                                          "reconnect_attempts_in_hole": retries})
    assert v.replayed > 0, "nothing went out as backlog: the blackhole did not hold anything back"
    assert v.sent > during


def test_uplink_flapping_reset_and_refused(rig):
    """The uplink drops (RST), refuses connections or lags (100-400 ms a chunk) every few seconds, for half
    a minute."""
    rig.start_agent()
    feeder = rig.feed("flap")
    assert rig.wait_results(50)
    rnd = random.Random(4)
    faults = {"reset": 0, "refuse": 0, "delay": 0}
    end = time.monotonic() + seconds(30)
    while time.monotonic() < end:
        time.sleep(rnd.uniform(1.5, 4.0))
        kind = ("reset", "refuse", "delay")[sum(faults.values()) % 3]
        faults[kind] += 1
        if kind == "reset":
            rig.proxy.reset()
            continue
        rig.proxy.refuse() if kind == "refuse" else rig.proxy.delay(rnd.uniform(100, 400))
        time.sleep(rnd.uniform(0.5, 2.5))
        rig.proxy.heal()
    time.sleep(3)
    v = rig.finish("uplink flapping (reset/refuse/delay)", feeder, extra={"faults": faults})
    assert v.extra["sink_disconnects"] >= 1
