"""The chaos rig: a source broker that persists every change, an uplink broker behind a FaultProxy, a
consumer on the uplink (never faulted itself), the agent as a real subprocess, and a steady feeder.

    producer ──► source broker ──► agent (subprocess) ──► FaultProxy ──► uplink broker ──► consumer
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..kit import wait_for
from ..kit.agent import AgentProcess
from ..kit.broker import Broker
from ..kit.clients import Collector
from ..kit.config import agent_config, write_toml
from ..kit.proxy import FaultProxy
from .harness import AgentLog, Feeder, Verdict, events, judge, report


class Rig:
    def __init__(self, tmp: Path, spawn: Callable[[Path, Path], AgentProcess], collect: Callable[..., Collector]):
        self.tmp = tmp
        self._spawn = spawn
        self.source = Broker(tmp / "source")
        # Save after every change: what the broker PUBACKed must survive its SIGKILL.
        self.source.conf.write_text(self.source.conf.read_text() + "autosave_on_changes true\n")
        self.source.start()
        self.uplink = Broker(tmp / "uplink").start()
        self.proxy = FaultProxy(self.uplink.port).start()
        self.collect = collect
        self.out = collect(self.uplink.port, "edge/results/#")
        self.outbox = tmp / "outbox.db"
        self.log = tmp / "agent.log"
        self._log = AgentLog(self.log)
        self.cfg = tmp / "agent.toml"
        self.agent: AgentProcess | None = None
        self.feeders: list[Feeder] = []
        self.starts: list[int] = []  # results arrived when each restart was spawned
        self.kills = 0  # SIGKILLs of the agent
        self.configure()

    def configure(self, *, replay_rate: float = 1000, max_bytes: int | None = None, drain_timeout_s: float = 2) -> None:
        """Write the agent's config: keepalive 5 s on both sides, reconnect delays 0.1-0.5 s, the sink
        through the proxy, logs at info (one JSON line per message: the agent's own counters)."""
        cfg = agent_config(source_port=self.source.port, sink_port=self.proxy.port, outbox=self.outbox,
                           pipeline={"drain_timeout_s": drain_timeout_s}, log={"level": "info"},
                           sink={"replay_rate": replay_rate})
        if max_bytes is not None:
            cfg["outbox"]["max_bytes"] = max_bytes
        write_toml(self.cfg, cfg)

    # the agent ------------------------------------------------------------------------------------
    def lines(self) -> list[dict]:
        return self._log.lines()

    def count(self, event: str) -> int:
        return len(events(self.lines(), event))

    def start_agent(self, wait_source: bool = True) -> AgentProcess:
        """Start the daemon; by default wait until its source session is connected and subscribed."""
        if self.agent is not None:
            self.starts.append(len(self.results()))
        before = self.count("source.connected")
        self.agent = self._spawn(self.cfg, self.log)
        if wait_source:
            assert wait_for(lambda: self.count("source.connected") > before or not self.agent.alive(), 30)
            assert self.agent.alive(), self.log.read_text()[-3000:]
            time.sleep(0.3)  # the SUBSCRIBE goes out on connect; let its SUBACK land
        return self.agent

    def kill_agent(self) -> None:
        assert self.agent is not None and self.agent.kill(signal.SIGKILL) == -signal.SIGKILL
        self.kills += 1

    def stop_agent(self) -> dict:
        """SIGTERM; assert a clean exit (0) and return the agent's `agent.stopped` line."""
        assert self.agent is not None and self.agent.alive(), "the daemon died: " + self.log.read_text()[-3000:]
        n = self.count("agent.stopped")
        assert self.agent.kill(signal.SIGTERM) == 0, self.log.read_text()[-3000:]
        stopped = events(self.lines(), "agent.stopped")
        assert len(stopped) == n + 1
        return stopped[-1]

    def outbox_rows(self) -> int:
        """Rows in the agent's outbox, read beside it (WAL: a reader never blocks the daemon)."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=5)) as conn:
                return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.Error:
            return -1  # not created yet, or moved aside

    # producers and results --------------------------------------------------------------------------
    def feed(self, tag: str, rate: float = 100.0) -> Feeder:
        f = Feeder(self.source.port, tag, rate)
        self.feeders.append(f)
        return f

    def results(self) -> list[dict]:
        return self.out.json("edge/results/")

    def wait_results(self, n: int, timeout: float = 30) -> bool:
        return wait_for(lambda: len(self.results()) >= n, timeout, 0.1)

    def finish(self, scenario: str, feeder: Feeder, *, may_lose: set[str] = frozenset(), timeout: float = 120,
               extra: dict | None = None) -> Verdict:
        """Stop producing, wait for every result, stop the daemon cleanly, and judge the run: the
        guarantees (harness.judge), the agent's own counters, and an empty outbox after a clean stop."""
        assert feeder.stop(), f"the source broker acknowledged {feeder.acked} of {len(feeder.sent)} notes"
        want = {nid for _, nid in feeder.sent} - set(may_lose)
        wait_for(lambda: want <= {r["input_id"] for r in self.results()} and self.outbox_rows() == 0, timeout, 0.2)
        assert self.agent is not None and self.agent.alive(), "the daemon is not running at the end"
        stopped = self.stop_agent()
        results = self.results()
        with (self.tmp / "results.jsonl").open("w") as f:  # for a post-mortem of a failed verdict
            f.writelines(json.dumps(r) + "\n" for r in results)
        lines = self.lines()
        processed = [e["input_id"] for e in events(lines, "message") if e.get("outcome") == "ok"]
        verdict = judge(scenario, feeder.sent, results, lines, starts=self.starts, may_lose=may_lose, extra={
            "processed": len(processed),  # > sent when the broker redelivered (a crash, a lost ack)
            "sink_disconnects": len(events(lines, "sink.disconnected")),
            "source_disconnects": len(events(lines, "source.disconnected")),
            "outbox_dropped": sum(e["count"] for e in events(lines, "outbox.dropped")),
            **(extra or {}),
        })
        # The agent's counters agree with the producer: it logged a commit for every note sent, except
        # where a SIGKILL fell between a commit and its log lines (its result is then the proof)...
        sent_ids = {nid for _, nid in feeder.sent}
        unlogged = sent_ids - set(processed)
        assert set(processed) <= sent_ids and unlogged <= {r["input_id"] for r in results}
        # A kill cuts off at most the batch being logged (pipeline.batch_max, 256).
        assert len(unlogged) <= 256 * self.kills, f"{len(unlogged)} notes never logged: {sorted(unlogged)[:5]}"
        verdict.extra["unlogged"] = len(unlogged)
        # ...and, stopped cleanly with the uplink up, it kept nothing back.
        assert stopped["outbox_rows"] == 0, stopped
        report(verdict)
        print(verdict.row())
        return verdict

    def close(self) -> None:
        if self.agent is not None and self.agent.alive():
            self.agent.kill(signal.SIGKILL)
        for f in self.feeders:
            f.close()
        self.proxy.close()
        for b in (self.source, self.uplink):
            if b.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    b.proc.send_signal(signal.SIGCONT)  # a test that failed mid-SIGSTOP
            b.stop(signal.SIGKILL)


@pytest.fixture
def rig(tmp_path: Path, spawn_agent, collect) -> Iterator[Rig]:
    r = Rig(tmp_path, spawn_agent, collect)
    yield r
    r.close()
