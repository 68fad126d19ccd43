"""What every chaos scenario shares: a steady feeder of uniquely numbered notes, the agent's JSON log read
back as counters, the end-to-end verdict, and one summary row per scenario.

The verdict asserts exactly what the agent promises (README "Guarantees", sink.py): every note that the
source broker acknowledged has a result; a duplicate carries the same result id; and each of the sink's
two lanes (live, and `"replayed": true`) publishes one route's outbox rows in commit order:

- live: rows committed while connected, in commit order, for the daemon's whole life and across
  restarts (a new process only commits rows newer than any an older one did);
- replayed: the backlog, in commit order within one process; a restarted process replays whatever is
  left from its oldest row again, so this lane may step back only across a (re)start.

A result is matched to the commit that produced it (a redelivered note is committed again, as a new row)
through its `processed_at` and the agent's per-message log line, whose order is commit order. That order
is the order the source broker delivered in: usually the producer's, but not always (a producer that
reconnects into a frozen broker may get its newest notes delivered before the older ones it re-sends).
Order is judged on first arrivals of each row: paho re-sending a row after a reconnect is a duplicate,
not a reordering.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def _scale() -> float:
    """EDGE_AGENT_CHAOS_LONG=1 runs every scenario 5x longer; =N runs it N times longer."""
    raw = os.environ.get("EDGE_AGENT_CHAOS_LONG", "")
    if not raw or raw == "0":
        return 1.0
    return 5.0 if raw == "1" else float(raw)


SCALE = _scale()


def seconds(base: float) -> float:
    return base * SCALE


TIMEOUT_S = int(300 * SCALE)  # per scenario, for pytest-timeout: the long mode needs more than the default


class Feeder:
    """A producer on the source broker: notes `{"id": "<tag>-<i>", "text": ...}` at a steady rate, QoS 1,
    round-robin over `topics`. paho keeps every unacknowledged note and re-sends it after a reconnect, so
    a note counts as sent once the broker PUBACKed it (`acked`)."""

    def __init__(self, port: int, tag: str, rate: float = 100.0,
                 topics: tuple[str, ...] = ("plant/a/notes", "plant/b/notes")) -> None:
        self.tag, self.rate, self.topics = tag, rate, topics
        self.sent: list[tuple[str, str]] = []  # (topic, input id), in publish order
        self._acked = 0
        self._lock = threading.Lock()  # ours alone: on_publish runs under paho's own mutex
        self._stop = threading.Event()
        self._paused = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"feeder-{tag}-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_publish = self._on_publish
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name=f"feeder-{tag}", daemon=True)
        self._thread.start()

    def _on_publish(self, *_a: object) -> None:
        with self._lock:
            self._acked += 1

    @property
    def acked(self) -> int:
        with self._lock:
            return self._acked

    def _run(self) -> None:
        i, t_next = 0, time.monotonic()
        while not self._stop.is_set():
            if self._paused.is_set():
                t_next = time.monotonic()
                self._stop.wait(0.05)
                continue
            topic = self.topics[i % len(self.topics)]
            nid = f"{self.tag}-{i}"
            text = f"P-{100 + i % 50} discharge {i % 90} bar, alarm E-{i % 7:03d}"
            self.sent.append((topic, nid))
            self.client.publish(topic, json.dumps({"id": nid, "text": text}), qos=1)
            i += 1
            t_next += 1 / self.rate
            self._stop.wait(max(0.0, t_next - time.monotonic()))

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self, settle: float = 60.0) -> bool:
        """Stop producing, then wait until the broker has acknowledged every note. True when it has."""
        self._stop.set()
        self._thread.join(10)
        deadline = time.monotonic() + settle
        while self.acked < len(self.sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.acked >= len(self.sent)

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()


class AgentLog:
    """The agent's JSON log (every run appends to one file), parsed incrementally: scenarios poll it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._lines: list[dict] = []

    def lines(self) -> list[dict]:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self._pos)
                chunk = f.read()
            done = chunk.rfind(b"\n") + 1  # a line still being written is read next time
            self._pos += done
            for line in chunk[:done].decode(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):  # paho's or a line cut by SIGKILL
                        self._lines.append(json.loads(line))
        return self._lines


def events(lines: list[dict], name: str) -> list[dict]:
    return [e for e in lines if e.get("event") == name]


@dataclass
class Verdict:
    scenario: str
    sent: int
    received_unique: int
    duplicates: int
    lost: int
    restarts: int
    replayed: int
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class Commits:
    """The agent's commits, read from its log: per note [(log time, commit rank, run)], where run counts
    the `agent.started` lines before it (one per process), and when each run started."""

    by_input: dict[str, list[tuple[float, int, int]]]
    started: list[float]

    @classmethod
    def of(cls, lines: list[dict]) -> Commits:
        by_input: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
        started: list[float] = []
        rank = 0
        for e in lines:
            if e.get("event") == "agent.started":
                started.append(_epoch(e["timestamp"]))
            elif e.get("event") == "message" and e.get("outcome") == "ok":
                by_input[e["input_id"]].append((_epoch(e["timestamp"]), rank, len(started)))
                rank += 1
        return cls(by_input, started)

    def rows(self, results: list[dict]) -> dict[tuple, int]:
        """(input id, processed_at, received_at) -> rank of the commit that made that outbox row.

        Copies of one row (re-sent, or live then replayed) carry the same stored payload, so the two
        times identify the row. A row belongs to the run going at its processed_at (set just before the
        commit, truncated to the ms); within that run a note's rows and commits are both in time order,
        and each row takes the first unused commit logged at or after its processed_at. A row whose log
        line a SIGKILL cut off (after the commit, before the write) stays unmatched, rather than being
        matched to its redelivery in the next run.
        """
        out: dict[tuple, int] = {}
        times: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for r in results:
            times[r["input_id"]].add((r["processed_at"], r["source"]["received_at"]))
        for nid, rows in times.items():
            cs, i = self.by_input.get(nid, []), 0
            for processed_at, received_at in sorted(rows):
                at = _epoch(processed_at)
                run = bisect.bisect_right(self.started, at)
                while i < len(cs) and (cs[i][2] < run or cs[i][0] < at):
                    i += 1
                if i < len(cs) and cs[i][2] == run:
                    out[(nid, processed_at, received_at)] = cs[i][1]
                    i += 1
        return out


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def judge(scenario: str, sent: list[tuple[str, str]], results: list[dict], lines: list[dict], *,
          starts: list[int] = (), may_lose: set[str] = frozenset(), extra: dict | None = None) -> Verdict:
    """Assert the end-to-end guarantees over `results` (in arrival order) and return the summary row.

    `lines`: the agent's log. `starts`: how many results had arrived when each restarted agent was spawned.
    `may_lose`: ids the scenario destroyed on purpose (a corrupt outbox moved aside, a bound drop); the
    caller asserts how many of them may be missing.
    """
    topic_of = dict((nid, t) for t, nid in sent)
    ids_by_input: dict[str, set[str]] = defaultdict(set)
    copies: Counter[str] = Counter()
    for r in results:
        ids_by_input[r["input_id"]].add(r["id"])
        copies[r["input_id"]] += 1
    strangers = set(ids_by_input) - set(topic_of)
    assert not strangers, f"results for notes never sent: {sorted(strangers)[:5]}"
    missing = [nid for _, nid in sent if nid not in ids_by_input]
    unexpected = [nid for nid in missing if nid not in may_lose]
    assert not unexpected, f"{len(unexpected)} of {len(sent)} notes have no result, e.g. {unexpected[:10]}"
    split = {nid: ids for nid, ids in ids_by_input.items() if len(ids) > 1}
    assert not split, f"duplicates with different result ids: {dict(list(split.items())[:3])}"
    for r in results:
        assert r["source"]["topic"] == topic_of[r["input_id"]], r
    unmatched = _assert_lane_order(results, Commits.of(lines), list(starts))
    return Verdict(scenario, len(sent), len(ids_by_input), sum(copies.values()) - len(copies), len(missing),
                   len(starts), sum(1 for r in results if r["replayed"]),
                   {**(extra or {}), "order_unmatched": unmatched})


def _assert_lane_order(results: list[dict], committed: Commits, starts: list[int]) -> int:
    """Assert the lanes' order; return how many results could not be matched to a logged commit."""
    ranks = committed.rows(results)
    lanes: dict[tuple[str, bool], list[tuple[int, int]]] = defaultdict(list)  # (arrival, rank)
    seen: set[tuple[bool, int]] = set()
    unmatched = 0
    for pos, r in enumerate(results):
        rank = ranks.get((r["input_id"], r["processed_at"], r["source"]["received_at"]))
        if rank is None:
            unmatched += 1
        elif (r["replayed"], rank) not in seen:
            seen.add((r["replayed"], rank))
            lanes[(r["source"]["topic"], r["replayed"])].append((pos, rank))
    for (topic, replayed), seq in lanes.items():
        back = [(a, b) for a, b in pairwise(seq) if b[1] < a[1]]
        if replayed:  # a restarted agent replays its backlog from the oldest row again
            back = [(a, b) for a, b in back if not any(a[0] < s <= b[0] for s in starts)]
        assert not back, (f"{topic} {'replayed' if replayed else 'live'} lane out of commit order at "
                          f"{len(back)} place(s), e.g. commit #{back[0][1][1]} arrived after #{back[0][0][1]}")
    return unmatched


def report(verdict: Verdict) -> None:
    """Append the row to $EDGE_AGENT_CHAOS_REPORT (JSON lines) when set, so a run can quote the table."""
    path = os.environ.get("EDGE_AGENT_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(verdict.row()) + "\n")
