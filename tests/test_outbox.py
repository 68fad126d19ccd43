"""The durable outbox: the buffer contract, bounds, durability, corrupt-file handling, and a stateful
model-based test that drives it through random sequences of put/batch/accept/expire/reopen."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from structlog.testing import capture_logs

from edge_agent.config import OutboxConfig
from edge_agent.errors import OutboxError
from edge_agent.outbox import store as outbox_mod
from edge_agent.outbox.store import Outbox, Record

MIN_BYTES = 64 * 1024  # the smallest max_bytes the config model allows
CORRUPT_NAME = re.compile(r"^outbox\.db\.corrupt-\d{8}T\d{6}Z$")


T0 = 1_760_000_000.0  # 2025-10: a set clock (expire() ignores readings before 2025, an unset RTC)


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, clock: FakeClock | None = None, **kw: object) -> Outbox:
    cfg = OutboxConfig(path=tmp_path / "outbox.db", **kw)
    return Outbox(cfg, clock=clock or FakeClock())


def row(i: int, size: int = 100, topic: str = "edge/results/t") -> tuple[str, str, bytes]:
    return (f"id-{i}", topic, i.to_bytes(4, "big") + b"x" * (size - 4))


def test_round_trip(tmp_path: Path) -> None:
    clock = FakeClock(123.5)
    with make(tmp_path, clock) as ob:
        assert ob.max_seq() == 0
        assert ob.put_many([("r1", "a/b", b"one"), ("r2", "a/é", b"\x00two")]) == 2
        got = ob.batch(10)
        assert got == [Record(1, "r1", "a/b", b"one", 123.5), Record(2, "r2", "a/é", b"\x00two", 123.5)]
        s = ob.stats()
        # size counts topic *bytes* (é is two), not characters
        assert (s.count, s.bytes, s.added, s.oldest_created_at) == (2, 3 + 3 + 4 + 4, 2, 123.5)
        assert s.path == tmp_path / "outbox.db"


def test_empty_put_writes_nothing_and_returns_max_seq(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        assert ob.put_many([]) == 0
        ob.put_many([row(1)])
        assert ob.put_many([]) == 1
        assert ob.stats().count == 1


def test_duplicate_ids_are_stored_twice(tmp_path: Path) -> None:
    # A redelivered input yields the same result id; both copies are kept, consumers de-duplicate.
    with make(tmp_path) as ob:
        ob.put_many([("same", "t", b"a")])
        ob.put_many([("same", "t", b"a")])
        assert [r.seq for r in ob.batch(10)] == [1, 2]


def test_batch_cursors(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ob.put_many([row(i) for i in range(10)])
        assert [r.seq for r in ob.batch(3)] == [1, 2, 3]
        assert [r.seq for r in ob.batch(3, after_seq=3)] == [4, 5, 6]
        assert [r.seq for r in ob.batch(100, after_seq=2, up_to_seq=5)] == [3, 4, 5]
        assert ob.batch(100, after_seq=5, up_to_seq=5) == []
        assert ob.batch(0) == []
        assert ob.batch(5, after_seq=10) == []


def test_seq_monotonic_across_reopen_and_after_deleting_everything(tmp_path: Path) -> None:
    ob = make(tmp_path)
    with ob:
        assert ob.put_many([row(1), row(2), row(3)]) == 3
        assert ob.accept([1, 2, 3]) == 3
        assert ob.stats().count == 0
        assert ob.max_seq() == 3
    with ob:
        assert ob.max_seq() == 3  # survives: sqlite_sequence, not MAX(seq) of the (empty) table
        assert ob.put_many([row(4)]) == 4


def test_accept_is_idempotent(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ob.put_many([row(i) for i in range(5)])
        assert ob.accept([2, 4, 4]) == 2
        assert ob.accept([2, 4]) == 0
        assert ob.accept([99, -1]) == 0
        assert ob.accept([]) == 0
        assert [r.seq for r in ob.batch(10)] == [1, 3, 5]
        s = ob.stats()
        assert (s.count, s.bytes, s.accepted) == (3, 3 * (100 + len("edge/results/t")), 2)


def test_accept_many_seqs_in_chunks(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        ob.put_many([row(i, 10) for i in range(1200)])
        assert ob.accept(range(1, 1201)) == 1200
        assert ob.stats().count == 0


def test_unaccepted_rows_reappear(tmp_path: Path) -> None:
    # reject = not accepting: the same rows come back on the next read and after a restart.
    ob = make(tmp_path)
    with ob:
        ob.put_many([row(i) for i in range(3)])
        first = ob.batch(10)
        assert ob.batch(10) == first
    with ob:
        assert ob.batch(10) == first


def test_max_bytes_drops_oldest_first(tmp_path: Path) -> None:
    topic = "t"
    size = 1000 + len(topic)
    with make(tmp_path, max_bytes=MIN_BYTES) as ob, capture_logs() as logs:
        fits = MIN_BYTES // size  # 65 rows fit
        ob.put_many([row(i, 1000, topic) for i in range(fits)])
        assert ob.stats().dropped == 0 and logs == []
        last = ob.put_many([row(i, 1000, topic) for i in range(fits, fits + 10)])
        assert last == fits + 10
        s = ob.stats()
        assert s.dropped == 10 and s.count == fits and s.bytes == fits * size <= MIN_BYTES
        assert ob.batch(1)[0].seq == 11  # seqs 1..10 went, the newest stayed
        assert [e for e in logs if e["event"] == "outbox.dropped"] == [
            {"event": "outbox.dropped", "count": 10, "reason": "max_bytes", "max_bytes": MIN_BYTES,
             "log_level": "warning"}
        ]
        # a seq that a bound dropped while the sink had it in flight: accepting it is a no-op
        assert ob.accept([1, 11]) == 1


def test_max_age_expiry(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 1000.0)
    with make(tmp_path, clock, max_age_s=60) as ob, capture_logs() as logs:
        ob.put_many([row(1), row(2)])
        clock.t = T0 + 1030.0
        ob.put_many([row(3)])
        clock.t = T0 + 1060.0
        assert ob.expire() == 0  # exactly max_age old is not older than max_age
        clock.t = T0 + 1061.0
        assert ob.expire() == 2
        assert [r.seq for r in ob.batch(10)] == [3]
        s = ob.stats()
        assert (s.count, s.dropped, s.oldest_created_at) == (1, 2, T0 + 1030.0)
        clock.t = T0 + 2000.0
        assert ob.expire() == 1
        assert ob.stats().oldest_created_at is None
        drops = [(e["count"], e["reason"]) for e in logs if e["event"] == "outbox.dropped"]
        assert drops == [(2, "max_age"), (1, "max_age")]


def test_durable_across_close_and_reopen(tmp_path: Path) -> None:
    rows = [row(i, 50 + i) for i in range(20)]
    ob = make(tmp_path)
    with ob:
        ob.put_many(rows[:10])
        ob.put_many(rows[10:])
        ob.accept([5])
        before = ob.batch(100)
        st_before = ob.stats()
    # a second, independent reader sees the committed rows too (WAL, not just our connection)
    with sqlite3.connect(tmp_path / "outbox.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 19
    raw.close()
    with Outbox(OutboxConfig(path=tmp_path / "outbox.db")) as again:
        assert again.batch(100) == before
        s = again.stats()
        assert (s.count, s.bytes) == (st_before.count, st_before.bytes)  # recomputed at open
        assert (s.added, s.accepted, s.dropped) == (0, 0, 0)  # counters are since open


def _moved(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.iterdir() if ".corrupt-" in p.name)


def _assert_moved_aside(tmp_path: Path, original: bytes, logs: list[dict]) -> Path:
    moved = _moved(tmp_path)
    main = [p for p in moved if CORRUPT_NAME.match(p.name)]
    assert len(main) == 1, moved
    # siblings keep SQLite's naming, so the moved set still opens together for forensics
    assert {p.name.removeprefix(main[0].name) for p in moved} <= {"", "-wal", "-shm"}
    assert main[0].read_bytes() == original  # preserved, never deleted
    events = [e for e in logs if e["event"] == "outbox.corrupt"]
    assert len(events) == 1 and events[0]["log_level"] == "error"
    assert events[0]["moved_to"] == str(main[0]) and events[0]["reason"]
    return main[0]


def test_garbage_file_is_moved_aside(tmp_path: Path) -> None:
    garbage = b"this is not sqlite " * 300
    (tmp_path / "outbox.db").write_bytes(garbage)
    with capture_logs() as logs, make(tmp_path) as ob:
        assert ob.stats().corrupt_files == 1
        assert ob.put_many([row(1)]) == 1  # the fresh outbox works
        assert [r.seq for r in ob.batch(5)] == [1]
    _assert_moved_aside(tmp_path, garbage, logs)


def test_truncated_database_is_moved_aside(tmp_path: Path) -> None:
    with make(tmp_path) as ob:
        for i in range(20):
            ob.put_many([row(i * 64 + k, 600) for k in range(64)])
    path = tmp_path / "outbox.db"
    assert not Path(f"{path}-wal").exists()  # close checkpointed the WAL into the main file
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    truncated = path.read_bytes()
    with capture_logs() as logs, make(tmp_path) as ob:
        s = ob.stats()
        assert (s.corrupt_files, s.count, s.bytes) == (1, 0, 0)
        assert ob.put_many([row(1)]) == 1
    _assert_moved_aside(tmp_path, truncated, logs)


def test_wal_sibling_moves_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"garbage" * 100)
    Path(f"{path}-wal").write_bytes(b"wal bytes")
    with capture_logs() as logs, make(tmp_path) as ob:
        assert ob.stats().corrupt_files == 1
    main = _assert_moved_aside(tmp_path, b"garbage" * 100, logs)
    assert Path(f"{main}-wal").read_bytes() == b"wal bytes"


def test_damaged_file_with_a_live_wal_is_moved_untouched(tmp_path: Path) -> None:
    # A crash leaves committed rows in -wal. Closing a read-write connection would checkpoint that WAL
    # into the damaged file and delete it; the moved-aside set must be exactly what was on disk.
    src, path = tmp_path / "src", tmp_path / "outbox.db"
    src.mkdir()
    writer = sqlite3.connect(src / "o.db", isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (x)")
    writer.executemany("INSERT INTO t VALUES (?)", [(os.urandom(600),) for _ in range(200)])
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.executemany("INSERT INTO t VALUES (?)", [(os.urandom(600),) for _ in range(200)])
    db, wal = (src / "o.db").read_bytes(), (src / "o.db-wal").read_bytes()
    writer.close()
    path.write_bytes(db[: len(db) // 2])
    Path(f"{path}-wal").write_bytes(wal)
    with capture_logs() as logs, make(tmp_path) as ob:
        assert ob.stats().corrupt_files == 1
    main = _assert_moved_aside(tmp_path, db[: len(db) // 2], logs)
    assert Path(f"{main}-wal").read_bytes() == wal


def test_unusable_schema_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, something TEXT)")
        raw.execute("PRAGMA user_version = 1")
    raw.close()
    with make(tmp_path) as ob:
        assert ob.stats().corrupt_files == 1
        assert ob.put_many([row(1)]) == 1


def test_newer_schema_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 3")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(OutboxError, match="schema version 3"):
        make(tmp_path).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox.db"]
    assert path.read_bytes() == before


def test_directory_is_created(tmp_path: Path) -> None:
    with Outbox(OutboxConfig(path=tmp_path / "a" / "b" / "outbox.db")) as ob:
        ob.put_many([row(1)])
    assert (tmp_path / "a" / "b" / "outbox.db").is_file()


def test_directory_that_cannot_be_created_is_an_outbox_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    ob = Outbox(OutboxConfig(path=tmp_path / "file" / "sub" / "outbox.db"))
    with pytest.raises(OutboxError, match=r"cannot create outbox directory .*file/sub"):
        ob.open()


def test_closed_outbox_refuses_work(tmp_path: Path) -> None:
    ob = make(tmp_path)
    with pytest.raises(OutboxError, match="not open"):
        ob.put_many([row(1)])
    ob.open()
    ob.open()  # idempotent
    ob.close()
    ob.close()
    for call in (lambda: ob.batch(1), lambda: ob.accept([1]), ob.expire, ob.max_seq, ob.stats):
        with pytest.raises(OutboxError):
            call()


def _hold_exclusive_lock(path: Path) -> sqlite3.Connection:
    # Another process's exclusive lock (rollback-journal mode): even readers get SQLITE_BUSY.
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_open_retries_while_the_file_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_mod, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(outbox_mod, "OPEN_ATTEMPTS", 6)
    holder = _hold_exclusive_lock(tmp_path / "outbox.db")
    release = threading.Timer(0.3, holder.close)
    release.start()
    try:
        with capture_logs() as logs, make(tmp_path) as ob:
            assert ob.put_many([row(1)]) == 1
            assert ob.stats().corrupt_files == 0  # locked is not corrupt: nothing moved aside
    finally:
        release.join()
    assert any(e["event"] == "outbox.locked" for e in logs)
    assert not _moved(tmp_path)


def test_open_gives_up_on_a_lock_that_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_mod, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(outbox_mod, "OPEN_ATTEMPTS", 2)
    holder = _hold_exclusive_lock(tmp_path / "outbox.db")
    try:
        with pytest.raises(OutboxError, match="locked"):
            make(tmp_path).open()
    finally:
        holder.close()
    assert not _moved(tmp_path)


def test_writer_and_reader_threads_share_one_outbox(tmp_path: Path) -> None:
    # The processor thread appends while the sink thread reads and accepts: nothing lost or doubled.
    total = 2000
    with make(tmp_path) as ob:
        def writer() -> None:
            for i in range(0, total, 50):
                ob.put_many([row(k) for k in range(i, i + 50)])

        t = threading.Thread(target=writer)
        t.start()
        seen: list[int] = []
        cursor = 0
        deadline = time.monotonic() + 60  # a lost row must fail the test, not hang it
        while len(seen) < total and time.monotonic() < deadline:
            recs = ob.batch(64, after_seq=cursor)
            if recs:
                cursor = recs[-1].seq
                seen.extend(r.seq for r in recs)
                ob.accept(r.seq for r in recs)
        t.join()
        assert seen == list(range(1, total + 1))
        assert ob.stats().count == 0


# --- stateful, model-based -----------------------------------------------------------------------

TOPICS = ("edge/results/a", "edge/é/b", "x")
ROWS = st.lists(
    st.tuples(
        st.sampled_from(("r1", "r2", "r3")),  # ids repeat on purpose: redelivery stores twice
        st.sampled_from(TOPICS),
        st.one_of(st.integers(0, 200), st.integers(2000, 9000)),  # payload size
    ),
    max_size=8,
)


class OutboxMachine(RuleBasedStateMachine):
    MAX_AGE = 50.0

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="outbox-model-")
        self.clock = FakeClock()
        path = Path(self.dir) / "outbox.db"
        self.cfg = OutboxConfig(path=path, max_bytes=MIN_BYTES, max_age_s=self.MAX_AGE)
        self.ob = Outbox(self.cfg, clock=self.clock).open()
        # the model: seq -> (id, topic, payload, created_at), insertion (= seq) order
        self.rows: dict[int, tuple[str, str, bytes, float]] = {}
        self.last_seq = 0
        self.added = self.accepted = self.dropped = 0
        self.serial = 0

    def teardown(self) -> None:
        self.ob.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def size(r: tuple[str, str, bytes, float]) -> int:
        return len(r[2]) + len(r[1].encode())

    def model_batch(self, n: int, after: int, up_to: int | None) -> list[Record]:
        seqs = [s for s in self.rows if s > after and (up_to is None or s <= up_to)][: max(n, 0)]
        return [Record(s, *self.rows[s]) for s in seqs]

    @rule(spec=ROWS)
    def put(self, spec: list[tuple[str, str, int]]) -> None:
        self._put(spec)

    @rule(sizes=st.lists(st.integers(15_000, 40_000), min_size=1, max_size=3))
    def drop(self, sizes: list[int]) -> None:
        # big enough that max_bytes must push out the oldest rows (and sometimes part of this batch)
        self._put([("big", "edge/big", n) for n in sizes])

    def _put(self, spec: list[tuple[str, str, int]]) -> None:
        rows = []
        for rid, topic, size in spec:
            self.serial += 1  # unique payload prefix: a mix-up between rows cannot go unnoticed
            rows.append((rid, topic, (self.serial.to_bytes(4, "big") * (size // 4 + 1))[:size]))
        last = self.ob.put_many(rows)
        for rid, topic, payload in rows:
            self.last_seq += 1
            self.rows[self.last_seq] = (rid, topic, payload, self.clock.t)
        self.added += len(rows)
        while sum(map(self.size, self.rows.values())) > MIN_BYTES:
            del self.rows[min(self.rows)]
            self.dropped += 1
            event("put dropped rows for max_bytes")
        assert last == self.last_seq

    @rule(n=st.integers(-1, 20), after=st.integers(-2, 60), up_to=st.none() | st.integers(0, 60))
    def batch(self, n: int, after: int, up_to: int | None) -> None:
        assert self.ob.batch(n, after_seq=after, up_to_seq=up_to) == self.model_batch(n, after, up_to)

    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        # any seq ever assigned (live, accepted before, or dropped by a bound) plus a never-assigned one
        pool = list(range(1, self.last_seq + 2))
        seqs = data.draw(st.lists(st.sampled_from(pool), max_size=10))
        expected = len({s for s in seqs if s in self.rows})
        for s in seqs:
            self.rows.pop(s, None)
        self.accepted += expected
        assert self.ob.accept(seqs) == expected

    @rule(n=st.integers(1, 10))
    def reject(self, n: int) -> None:
        # read a batch, publish fails, nothing is accepted: the same rows must come back
        first = self.ob.batch(n)
        assert first == self.model_batch(n, 0, None)
        assert self.ob.batch(n) == first

    @rule(dt=st.floats(0, 40))
    def tick_and_expire(self, dt: float) -> None:
        self.clock.t += dt
        cutoff = self.clock.t - self.MAX_AGE
        old = [s for s, r in self.rows.items() if r[3] < cutoff]
        for s in old:
            del self.rows[s]
        self.dropped += len(old)
        event(f"expire dropped rows: {bool(old)}")
        assert self.ob.expire() == len(old)

    @rule()
    def reopen(self) -> None:
        before = self.ob.batch(10_000)
        self.ob.close()
        self.ob = Outbox(self.cfg, clock=self.clock).open()
        assert self.ob.batch(10_000) == before
        self.added = self.accepted = self.dropped = 0  # counters are since open

    @invariant()
    def matches_model(self) -> None:
        s = self.ob.stats()
        assert s.count == len(self.rows)
        assert s.bytes == sum(map(self.size, self.rows.values()))
        assert (s.added, s.accepted, s.dropped) == (self.added, self.accepted, self.dropped)
        assert s.oldest_created_at == min((r[3] for r in self.rows.values()), default=None)
        assert self.ob.max_seq() == self.last_seq


OutboxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_outbox_matches_model = OutboxMachine.TestCase


def test_unset_clock_never_expires_rows_early(tmp_path: Path) -> None:
    """A gateway without an RTC boots near 1970, stamps rows, then NTP jumps the clock to today: the
    rows are minutes old, not 55 years, and must survive until max_age after the clock was set."""
    clock = FakeClock(600.0)  # 1970-01-01 00:10, ten minutes after an RTC-less boot
    with make(tmp_path, clock, max_age_s=3600) as ob, capture_logs() as logs:
        ob.put_many([row(1), row(2)])
        clock.t = 4000.0  # still unset, and "older than max_age" by the raw numbers: kept
        assert ob.expire() == 0
        clock.t = T0  # NTP synced
        ob.put_many([row(3)])
        assert ob.expire() == 0
        assert [r.created_at for r in ob.batch(10)] == [T0, T0, T0]  # aged from the first set reading
        clock.t = T0 + 3600.0
        assert ob.expire() == 0
        clock.t = T0 + 3601.0  # max_age after the sync: now they go, all three
        assert ob.expire() == 3
        s = ob.stats()
        assert (s.count, s.dropped, s.dropped_max_age, s.dropped_max_bytes) == (0, 3, 3, 0)
        events = [e["event"] for e in logs]
        assert events.count("outbox.clock_unset") == 1 and events.count("outbox.clock_restamped") == 1


def test_backward_clock_jump_keeps_future_rows(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 10_000.0)
    with make(tmp_path, clock, max_age_s=60) as ob:
        ob.put_many([row(1)])
        clock.t = T0  # stepped back by NTP: the row now sits in the future
        assert ob.expire() == 0
        clock.t = T0 + 10_061.0
        assert ob.expire() == 1  # and still expires once it really is max_age old


def test_outbox_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from edge_agent.errors import OutboxError
    from edge_agent.outbox.lock import OutboxLock

    db = tmp_path / "outbox.db"
    with OutboxLock(db), pytest.raises(OutboxError, match=r"in use by a running edge-agent \(pid \d+\)"):
        OutboxLock(db).acquire()
    OutboxLock(db).acquire().release()  # free again once released


def test_dead_letters_have_their_own_bound_and_never_evict_results(tmp_path: Path) -> None:
    """Before, one 12 MB dead letter evicted 621 of 2,000 waiting results, and 300 rate-limited messages all
    1,000 of another route's: dead letters now evict only older dead letters."""
    with make(tmp_path, max_bytes=MIN_BYTES * 4, dead_letter_max_bytes=MIN_BYTES) as ob, capture_logs() as logs:
        ob.put_many([row(i, 1000) for i in range(200)])  # ~200 KB of results, under max_bytes
        for k in range(30):  # a flood of bad input: 30 x 10 dead letters of 1 KB, 5x their bound
            ob.put_many([], dead=[row(1000 + 10 * k + j, 1000, "edge/deadletter") for j in range(10)])
        s = ob.stats()
        assert s.count - s.dead_letters == 200  # every result still there
        assert s.dead_letter_bytes <= MIN_BYTES and s.dead_letters >= 60
        assert s.dropped == s.dropped_dead_letter_max_bytes == 300 - s.dead_letters and s.dropped_max_bytes == 0
        kept = ob.batch(1000)
        dead_ids = [r.id for r in kept if r.topic == "edge/deadletter"]
        assert dead_ids == [f"id-{i}" for i in range(1300 - s.dead_letters, 1300)]  # the newest ones
        # Results past their own bound drop the oldest results, never a dead letter.
        ob.put_many([row(2000 + i, 1000) for i in range(100)])
        s2 = ob.stats()
        assert s2.dead_letters == s.dead_letters and s2.dropped_max_bytes > 0
        assert ob.batch(1)[0].id != "id-0"
    assert {e["reason"] for e in logs if e["event"] == "outbox.dropped"} == {"dead_letter_max_bytes", "max_bytes"}
    with make(tmp_path) as ob:  # the split survives a reopen
        assert (ob.stats().dead_letters, ob.stats().dead_letter_bytes) == (s2.dead_letters, s2.dead_letter_bytes)


def test_a_version_1_outbox_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, topic TEXT NOT NULL,"
            " size INTEGER NOT NULL, created_at REAL NOT NULL, payload BLOB NOT NULL);"
            "CREATE INDEX outbox_created_at ON outbox (created_at); PRAGMA user_version = 1;"
        )
        raw.execute("INSERT INTO outbox (id, topic, size, created_at, payload) VALUES ('a', 't', 5, 1.0, x'0102')")
    raw.close()
    with make(tmp_path) as ob:
        assert [r.id for r in ob.batch(10)] == ["a"]
        assert (ob.stats().count, ob.stats().dead_letters) == (1, 0)
        ob.put_many([], dead=[row(2, 100, "edge/deadletter")])
        assert ob.stats().dead_letters == 1
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    raw.close()


def _remove_outbox_files(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_deleted_file_is_noticed_and_recreated_with_its_rows(tmp_path: Path) -> None:
    """rm outbox.db* under the open outbox: check_file notices, counts and logs it, and the rows (seqs kept,
    and the seq high-water mark) are in a new file at the path, where another reader sees them."""
    from structlog.testing import capture_logs

    with make(tmp_path) as ob:
        ob.put_many([row(i) for i in range(5)])
        ob.accept([1])  # seq 1 gone: the new file must not reuse it
        assert ob.check_file()
        _remove_outbox_files(tmp_path / "outbox.db")
        with capture_logs() as logs:
            assert not ob.check_file()
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["outbox.file_lost"]
        assert logs[0]["how"] == "deleted" and logs[0]["rows"] == 4
        assert (tmp_path / "outbox.db").exists() and ob.check_file()
        assert [r.seq for r in ob.batch(10)] == [2, 3, 4, 5]
        assert ob.put_many([row(9)]) == 6
        s = ob.stats()
        assert (s.count, s.files_lost) == (5, 1)
    with make(tmp_path) as again:  # what the next start (or `outbox stats`) finds
        assert [r.seq for r in again.batch(10)] == [2, 3, 4, 5, 6] and again.max_seq() == 6


def test_replaced_file_is_moved_aside_never_deleted(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with make(tmp_path) as ob:
        ob.put_many([row(i) for i in range(3)])
        stranger = tmp_path / "other.db"
        stranger.write_bytes(b"someone else's file")
        _remove_outbox_files(db)
        stranger.rename(db)
        assert not ob.check_file()
        aside = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
        assert len(aside) == 1 and aside[0].read_bytes() == b"someone else's file"
        assert [r.seq for r in ob.batch(10)] == [1, 2, 3] and ob.stats().files_lost == 1


@pytest.mark.parametrize("case", ["parent-is-a-file", "read-only-fs"])
def test_unusable_outbox_path_is_a_config_error_naming_it(tmp_path: Path, case: str) -> None:
    """`edge-agent run` exits 2 naming outbox.path, with a fix, instead of a traceback."""
    import subprocess
    import sys

    from .kit import REPO
    from .kit.broker import free_port
    from .kit.config import write_config

    if case == "parent-is-a-file":
        (tmp_path / "afile").write_text("x")
        db = tmp_path / "afile" / "outbox.db"
    else:
        mnt = tmp_path / "ro"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
        db = mnt / "outbox.db"
    try:
        cfg = write_config(tmp_path / "c.toml", source_port=free_port(), sink_port=free_port(), outbox=db)
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    finally:
        if case == "read-only-fs":
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "outbox.path" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stdout + r.stderr


def test_wall_clock_step_never_expires_rows_early(tmp_path: Path) -> None:
    """A 40-day forward step (wall clock only; the monotonic clock counts what really passed) moves every
    row's created_at with it: nothing expires for the step, rows expire once max_age has really passed."""
    from structlog.testing import capture_logs

    wall, mono = FakeClock(T0), FakeClock(1000.0)
    ob = Outbox(OutboxConfig(path=tmp_path / "outbox.db", max_age_s=3600), clock=wall, monotonic=mono).open()
    try:
        ob.put_many([row(i) for i in range(3)])
        wall.t += 600
        mono.t += 600
        ob.put_many([row(3)])  # 10 min later: no step
        wall.t += 40 * 86400  # NTP steps the clock 40 days ahead
        with capture_logs() as logs:
            assert ob.expire() == 0
        steps = [e for e in logs if e["event"] == "outbox.clock_step"]
        assert len(steps) == 1 and steps[0]["rows_restamped"] == 4 and steps[0]["step_s"] == 40 * 86400
        wall.t += 3001
        mono.t += 3001  # 3,601 s after the first three rows
        assert ob.expire() == 3  # ... which go now, and only they
        wall.t += 600
        mono.t += 600
        assert ob.expire() == 1
        wall.t -= 7 * 86400  # and a backward step: rows do not live on for it either
        ob.put_many([row(9)])
        wall.t += 3601
        mono.t += 3601
        assert ob.expire() == 1
    finally:
        ob.close()


def test_kept_results_are_bounded_by_bytes_oldest_first(tmp_path: Path) -> None:
    """The results kept for the digest and corrections by id (`recent`) have their own byte bound."""
    with make(tmp_path, recent_max_bytes=MIN_BYTES) as ob:
        for k in range(10):  # 10 x 20 x 1 KB = 200 KB of kept results, three times the bound
            ob.put_many([], recent=[(f"r{k}-{i}", 1000.0 * k + i, b"x" * 1000) for i in range(20)])
        kept = ob.recent_between(0, 1e9)
        assert 40 <= len(kept) <= MIN_BYTES // 1000
        assert ob.get_recent("r9-19") is not None and ob.get_recent("r0-0") is None  # the oldest went first
    with make(tmp_path, recent_max_bytes=MIN_BYTES) as ob:  # the count survives a reopen
        ob.put_many([], recent=[("new", 1e6, b"y" * 1000)])
        assert len(ob.recent_between(0, 1e9)) <= MIN_BYTES // 1000
