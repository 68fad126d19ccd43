"""Faults of the local (source) broker itself: killed and restarted from its persistence, and frozen."""

from __future__ import annotations

import signal
import time

import pytest

from ..kit import wait_for
from .harness import TIMEOUT_S, seconds

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT_S)]


def test_source_broker_sigkill_restart_and_sigstop(rig):
    """SIGKILL the source broker twice mid-stream (restarted from its persistence file), then freeze it
    (SIGSTOP) for longer than the agent's keepalive and thaw it (SIGCONT)."""
    rig.start_agent()
    feeder = rig.feed("src", rate=150)
    assert rig.wait_results(200)
    kills = 0
    for _ in range(2):
        time.sleep(seconds(3))
        # The producer's PUBACKed notes must be on the broker's disk before the kill: Mosquitto saves after
        # each change, but only once its loop has sent the PUBACK. Its durability is not under test; the
        # agent's unacked deliveries and queued session messages are, and stay in flight across the kill.
        feeder.pause()
        time.sleep(0.5)
        rig.source.stop(signal.SIGKILL)
        kills += 1
        feeder.resume()  # paho queues what it cannot send and re-sends it after the restart
        time.sleep(1.0)
        rig.source.start()
    # Back on the restarted broker before it is frozen, or the freeze only delays a reconnect.
    assert wait_for(lambda: rig.count("source.connected") >= 1 + kills, 30, 0.1)
    assert rig.wait_results(len(feeder.sent) // 2)
    disconnects = rig.count("source.disconnected")
    rig.source.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        noticed = wait_for(lambda: rig.count("source.disconnected") > disconnects, 30, 0.2)
        noticed_s = time.monotonic() - t0
        time.sleep(max(0.0, seconds(12) - noticed_s))
    finally:
        rig.source.proc.send_signal(signal.SIGCONT)
    assert noticed, "the agent never noticed its frozen source broker"
    time.sleep(3)
    v = rig.finish("source broker SIGKILL x2 + SIGSTOP", feeder,
                   extra={"broker_kills": kills, "sigstop_noticed_after_s": round(noticed_s, 1)})
    assert v.extra["source_disconnects"] >= kills + 1
