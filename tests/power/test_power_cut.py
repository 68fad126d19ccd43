"""Power loss, proven rather than claimed: the daemon's outbox on a filesystem that forgets what was never
synced (tests/power/lazyfs.py), under a steady QoS 1 stream, with the power cut at 24 random points,
several of them inside a commit (WAL frames written, not yet fsynced) and inside a checkpoint (WAL pages
being copied into the main file).

    feeder ──► source broker ──► agent (subprocess; its outbox on lazyfs) ──► FaultProxy ──► uplink ──► collector

Only the agent's disk loses power: the brokers keep running (a broker is another machine), configured so
that they themselves lose nothing (no queue limit; persistent sessions for the agent and the collector).
A cut is: freeze the filesystem (from that instant nothing becomes durable), SIGKILL the agent, unmount,
rewrite the disk to its durable image, mount again, start the agent again.

What is asserted, and why it is the guarantee:

1. After every cut the outbox, as the disk holds it, opens and passes `PRAGMA quick_check`, and the agent
   opens it without quarantining it (no `outbox.corrupt`).
2. After every cut, every result the agent had committed (its `message` log line is written after the
   commit returned, and before that line the inbound message is acked), and that the uplink had not
   received, is in the outbox on the disk. This is "acked before the cut => survives the cut", checked
   at each cut, on the disk itself: the log lives on the real filesystem, so it remembers commits that a
   lying disk would forget.
3. At the end, every note the source broker PUBACKed to the feeder (the feeder counts PUBACKs, and waits
   for all of them) has its result at the collector: what the agent acked survived (2), what it had not
   acked was redelivered by the broker. Lost: 0. Deduplicated by result id, one result id per note.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from ..chaos.harness import Feeder
from ..kit import wait_for
from ..kit.agent import log_events
from ..kit.broker import Broker
from ..kit.clients import Collector
from ..kit.config import write_config
from ..kit.proxy import FaultProxy
from .mount import LazyMount, read_outbox, require_fuse

CUTS = int(os.environ.get("EDGE_AGENT_POWER_CUTS", "24"))
SEED = int(os.environ.get("EDGE_AGENT_POWER_SEED", "20261207"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class BigFeeder(Feeder):
    """The chaos feeder with ~1.5 KB notes: a result spans a page, so the WAL reaches SQLite's
    autocheckpoint (1000 pages) every few seconds and cuts can land inside checkpoints."""

    PAD = " ".join(f"reading {k}: pressure nominal, valve V-{k:03d} open" for k in range(32))

    def _run(self) -> None:
        i, t_next = 0, time.monotonic()
        while not self._stop.is_set():
            if self._paused.is_set():
                t_next = time.monotonic()
                self._stop.wait(0.05)
                continue
            topic = self.topics[i % len(self.topics)]
            nid = f"{self.tag}-{i}"
            self.sent.append((topic, nid))
            text = f"P-{100 + i % 50} discharge {i % 90} bar, alarm E-{i % 7:03d}. {self.PAD}"
            self.client.publish(topic, json.dumps({"id": nid, "text": text}), qos=1)
            i += 1
            t_next += 1 / self.rate
            self._stop.wait(max(0.0, t_next - time.monotonic()))


def _lossless(b: Broker) -> Broker:
    # Mosquitto's default max_queued_messages (1000) drops messages for a client that is away: the very
    # thing this test must not blame on the agent. 0 is "no limit".
    b.conf.write_text(b.conf.read_text().replace("max_queued_messages 100000", "max_queued_messages 0"))
    return b


def _committed(logs: list[Path]) -> dict[str, str]:
    """result id -> input id, for every result the agent logged as committed (and so acked)."""
    out = {}
    for log in logs:
        if log.exists():
            for e in log_events(log, "message"):
                if e.get("outcome") == "ok":
                    out[e["result_id"]] = e["input_id"]
    return out


def test_power_cut_at_random_points_loses_nothing(tmp_path: Path, spawn_agent) -> None:
    require_fuse()
    rnd = random.Random(SEED)
    source = _lossless(Broker(tmp_path / "source")).start()
    uplink = _lossless(Broker(tmp_path / "uplink")).start()
    proxy = FaultProxy(uplink.port).start()
    out = Collector(uplink.port, "edge/results/#")
    assert out.subscribed.wait(10)
    disk = LazyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lazyfs.sock", seed=SEED)
    # The daemon makes the outbox directory itself, as on a fresh gateway.
    outbox = disk.mountpoint / "state" / "outbox.db"
    cfg = write_config(tmp_path / "agent.toml", source_port=source.port, sink_port=proxy.port, outbox=outbox,
                       pipeline={"drain_timeout_s": 2}, log={"level": "info"})
    logs: list[Path] = []
    feeder: BigFeeder | None = None
    cuts: list[dict] = []
    agent = None

    def start_agent(wait: bool) -> None:
        nonlocal agent
        logs.append(tmp_path / f"agent-{len(logs)}.log")
        agent = spawn_agent(cfg, logs[-1])
        if wait:
            assert wait_for(lambda: log_events(logs[-1], "source.connected") or not agent.alive(), 30), \
                logs[-1].read_text()[-3000:]
            assert agent.alive(), logs[-1].read_text()[-3000:]

    # Cut points: a third in a commit, a third in a checkpoint, a third at a random moment (some while the
    # daemon is still starting and recovering). Every fourth cut is "torn": the disk keeps a random half of
    # the writes it had not been asked to sync (the rest are lost), which SQLite's checksums must catch.
    kinds = (["commit", "checkpoint", "random"] * (CUTS // 3 + 1))[:CUTS]
    rnd.shuffle(kinds)
    try:
        for k, kind in enumerate(kinds):
            disk.mount()
            torn = k % 4 == 3
            disk.torn(0.5 if torn else 0.0)
            backlog = rnd.random() < 0.5  # the uplink away: results pile up in the outbox meanwhile
            proxy.refuse() if backlog else proxy.heal()
            start_agent(wait=kind != "random")
            if feeder is None:
                feeder = BigFeeder(source.port, "pwr", rate=120)
            plan: dict = {"kind": kind, "torn": torn, "backlog": backlog}
            assert agent is not None
            if kind == "random":
                time.sleep(rnd.uniform(0.2, 4.0))
                assert agent.alive(), logs[-1].read_text()[-3000:]  # it never dies of a previous cut
                report = disk.cut()
            else:
                time.sleep(rnd.uniform(0.3, 2.0))
                assert agent.alive(), logs[-1].read_text()[-3000:]
                # A commit writes a few WAL frames, then fsyncs; a checkpoint writes tens of pages.
                name, nth = ("outbox.db-wal", rnd.randint(1, 6)) if kind == "commit" else \
                    ("outbox.db", rnd.randint(1, 4))
                disk.arm(name, nth)
                plan["trap"] = f"{name} write #{nth}"
                report = disk.wait(20)
                if not report.get("frozen"):
                    plan["trap_timed_out"] = True
                    report = disk.cut()
            t_cut = time.monotonic()
            agent.kill(signal.SIGKILL)
            # A cut while it was still starting (recovering the WAL, before `agent.started`) is one of the
            # random points; every other run had opened its outbox.
            opened = bool(log_events(logs[-1], "agent.started"))
            disk.unmount()  # the reboot: the disk now holds only what was durable
            time.sleep(0.7)  # what the uplink PUBACKed before the cut reaches the collector
            delivered = {r["id"] for r in out.json("edge/results/")}
            on_disk = read_outbox(disk.backing / "state" / "outbox.db", tmp_path / "scratch")
            committed = _committed(logs)
            missing = sorted(set(committed) - delivered - on_disk["ids"])
            unsynced = report.get("unsynced_bytes", {})
            cuts.append({
                **plan,
                "trigger": report.get("trigger"),
                "during_startup": not opened,
                "mid_commit": "outbox.db-wal" in unsynced,
                "mid_checkpoint": "outbox.db" in unsynced,
                "unsynced": unsynced,
                "unsynced_dirs": report.get("unsynced_dirs"),
                "rows_on_disk": len(on_disk["ids"]),
                "committed": len(committed),
                "missing": len(missing),
                "outbox_ok": on_disk["ok"],
                "kill_to_check_s": round(time.monotonic() - t_cut, 2),
            })
            print(f"cut {k + 1:2d}", json.dumps(cuts[-1]))
            assert on_disk["ok"], f"cut {k + 1}: the outbox on the disk does not open cleanly: {on_disk}"
            assert not missing, (f"cut {k + 1} ({plan}): {len(missing)} committed results neither delivered nor "
                                 f"on the disk, e.g. {[(m, committed[m]) for m in missing[:5]]}")

        # Recovery, with the uplink back: everything the broker acknowledged must come out.
        disk.mount()
        proxy.heal()
        start_agent(wait=True)
        assert feeder is not None
        assert feeder.stop(), f"the source broker acknowledged {feeder.acked} of {len(feeder.sent)} notes"
        sent = {nid for _, nid in feeder.sent}

        def inputs() -> set[str]:
            return {r["input_id"] for r in out.json("edge/results/")}

        wait_for(lambda: sent <= inputs(), 90, 0.2)
        assert agent is not None and agent.alive()
        assert agent.kill(signal.SIGTERM) == 0, logs[-1].read_text()[-3000:]
        disk.unmount()
        results = out.json("edge/results/")
        lost = sorted(sent - inputs())
        ids_per_input: dict[str, set[str]] = {}
        for r in results:
            ids_per_input.setdefault(r["input_id"], set()).add(r["id"])
        corrupt = sum(len(log_events(p, "outbox.corrupt")) for p in logs)
        summary = {
            "cuts": len(cuts),
            "mid_commit": sum(c["mid_commit"] for c in cuts),
            "mid_checkpoint": sum(c["mid_checkpoint"] for c in cuts),
            "trap_fired_commit": sum(c["kind"] == "commit" and not c.get("trap_timed_out") for c in cuts),
            "trap_fired_checkpoint": sum(c["kind"] == "checkpoint" and not c.get("trap_timed_out") for c in cuts),
            "torn": sum(c["torn"] for c in cuts),
            "with_backlog": sum(c["backlog"] for c in cuts),
            "max_rows_on_disk": max(c["rows_on_disk"] for c in cuts),
            "published": len(feeder.sent),
            "broker_acked": feeder.acked,
            "agent_committed": len(set(_committed(logs).values())),
            "delivered_inputs": len(inputs()),
            "results_received": len(results),
            "unique_result_ids": len({r["id"] for r in results}),
            "lost": len(lost),
            "quarantined": corrupt,
            "cuts_during_startup": sum(c["during_startup"] for c in cuts),
        }
        print("power-cut summary", json.dumps(summary))
        (tmp_path / "power-summary.json").write_text(json.dumps({"summary": summary, "cuts": cuts}, indent=1))

        assert not lost, f"{len(lost)} acknowledged notes never got a result: {lost[:10]}"
        assert corrupt == 0, "the agent quarantined its outbox after a power cut"
        assert all(c["during_startup"] is False for c in cuts if c["kind"] != "random"), cuts
        assert all(len(ids) == 1 for ids in ids_per_input.values()), "a redelivered note got another result id"
        assert summary["cuts"] == CUTS
        # The traps did their job: cuts really landed with WAL frames unsynced, and inside checkpoints.
        assert summary["mid_commit"] >= CUTS // 5 and summary["mid_checkpoint"] >= CUTS // 8, summary
    finally:
        if agent is not None and agent.alive():
            agent.kill(signal.SIGKILL)
        disk.close()
        if feeder is not None:
            feeder.close()
        out.close()
        proxy.close()
        for b in (source, uplink):
            with contextlib.suppress(Exception):
                b.stop(signal.SIGKILL)
