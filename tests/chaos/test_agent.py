"""Faults of the agent process itself: SIGKILL at random moments, SIGTERM mid-drain, SIGSTOP/SIGCONT, and
an outbox file damaged while the daemon was down."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time

import pytest

from ..kit import wait_for
from .harness import SCALE, TIMEOUT_S, seconds

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT_S)]


def test_agent_sigkilled_five_times_then_sigterm_mid_drain(rig):
    # A slow replay, so that the drain after an outage takes seconds and a SIGTERM can land inside it;
    # a short drain timeout, so that the stop does not simply finish the drain first.
    rig.configure(replay_rate=150, drain_timeout_s=1)
    rig.start_agent()
    feeder = rig.feed("kill")
    assert rig.wait_results(50)
    rnd = random.Random(5)
    for _ in range(5):
        time.sleep(rnd.uniform(0.5, 4.0) * SCALE)  # some land while the agent is still starting
        rig.kill_agent()
        started = rig.count("agent.started")
        rig.start_agent(wait_source=False)  # at once, as systemd's Restart= would
    assert wait_for(lambda: rig.count("agent.started") > started, 30)  # the last one came up

    # Results pile up in the outbox while the uplink refuses us, and stay there across a clean stop...
    rig.proxy.refuse()
    time.sleep(seconds(8))  # ~800 rows: over 5 s of replay at 150/s
    assert rig.stop_agent()["outbox_rows"] > 0
    rig.proxy.heal()
    replayed_before = sum(r["replayed"] for r in rig.results())
    rig.start_agent()
    # ...and are replayed at 150/s after the restart: SIGTERM once the drain is under way.
    assert wait_for(lambda: sum(r["replayed"] for r in rig.results()) > replayed_before + 50, 30, 0.1)
    left = rig.stop_agent()["outbox_rows"]
    assert left > 0, "the drain had finished: the SIGTERM did not land inside it"
    rig.start_agent()
    time.sleep(2)
    v = rig.finish("agent SIGKILL x5 + SIGTERM mid-drain", feeder, extra={"rows_left_at_sigterm": left})
    assert v.restarts == 7


def test_agent_frozen_by_sigstop_then_thawed(rig):
    """SIGSTOP the daemon for longer than its keepalive: both brokers drop it (the uplink publishes its
    last will, "offline"), notes queue in its source session; after SIGCONT it reconnects and catches up."""
    status = rig.collect(rig.uplink.port, "edge/status/#")

    def states() -> list[str]:
        return [json.loads(p)["state"] for _, p, _ in status.messages]

    rig.start_agent()
    feeder = rig.feed("freeze")
    assert rig.wait_results(100)
    assert wait_for(lambda: "online" in states(), 10)
    seen = len(states())
    rig.agent.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        will = wait_for(lambda: "offline" in states()[seen:], 30, 0.2)  # 1.5x keepalive at the broker
        will_s = time.monotonic() - t0
        time.sleep(max(0.0, seconds(12) - will_s))
    finally:
        rig.agent.proc.send_signal(signal.SIGCONT)
    assert will, "the uplink broker never published the frozen agent's last will"
    assert wait_for(lambda: states()[-1] == "online", 30, 0.2), states()
    time.sleep(3)
    rig.finish("agent SIGSTOP 12 s + SIGCONT", feeder, extra={"will_after_s": round(will_s, 1)})


def _rows_at_risk(db) -> set[str]:
    """Input ids whose results sit only in this outbox file."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {json.loads(p)["input_id"] for (p,) in conn.execute("SELECT payload FROM outbox")}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_outbox_damaged_while_stopped_is_moved_aside(rig, damage):
    rig.start_agent()
    feeder = rig.feed(f"ob-{damage}")
    assert rig.wait_results(50)
    rig.proxy.refuse()
    time.sleep(seconds(3))
    assert rig.stop_agent()["outbox_rows"] > 0
    at_risk = _rows_at_risk(rig.outbox)
    size = rig.outbox.stat().st_size
    if damage == "truncated":
        os.truncate(rig.outbox, size // 2)
    else:
        rig.outbox.write_bytes(random.Random(6).randbytes(size))
    rig.proxy.heal()
    rig.start_agent()
    aside = list(rig.tmp.glob("outbox.db.corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], "the damaged file was not kept"
    assert rig.count("outbox.corrupt") == 1
    time.sleep(seconds(3))
    v = rig.finish(f"outbox {damage} while stopped", feeder, may_lose=at_risk,
                   extra={"rows_in_damaged_file": len(at_risk)})
    # What was lost is exactly what only the damaged file held (the producer's notes had been acked).
    assert v.lost <= len(at_risk)
