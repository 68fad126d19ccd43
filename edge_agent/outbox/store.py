"""The durable outbox: every result is committed here before its inbound message is acked.

The contract is Telegraf's buffer, made durable: ``put_many`` adds (and may drop the oldest rows when the
byte bound is hit), ``batch`` reads, ``accept`` deletes what the uplink broker PUBACKed. Not accepting a
row is the reject: it stays and shows up in the next ``batch``. Rows leave only through ``accept`` or a
bound (``max_bytes`` in ``put_many``, ``max_age_s`` in ``expire``), every bound drop counted and logged.

One SQLite connection is shared by the processor thread (writes) and the sink thread (reads, deletes),
serialised by one lock: SQLite's own locking would only turn contention into SQLITE_BUSY retries, and a
single connection keeps ``last_insert_rowid()`` and transactions unambiguous.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import structlog
import tenacity

from ..config import OutboxConfig
from ..errors import OutboxError, TransientError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
# Payload last: SQLite reads columns in order, so seq/size/created_at stay cheap to read even if a big
# payload spills onto overflow pages. The created_at index makes expire() and oldest_created_at
# O(log n) instead of a scan of the whole (possibly 512 MB) table. `dead` marks a dead letter: dead
# letters have their own byte bound and evict only each other, found through a small partial index.
# `meta` is the daemon's own small state that must survive with the rows (the filters it subscribed, the
# last digest window, the head versions it learned); `recent` keeps published results after they have left
# the outbox, for a while (the shift digest and corrections by result id read them), written in the same
# commit as the outbox rows and trimmed by trim_recent(); `feedback` holds the corrections received
# (edge_agent.feedback), oldest dropped first.
_SIDE_TABLES = """
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (seq) WHERE dead = 1;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recent (id TEXT PRIMARY KEY, received_at REAL NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS recent_received_at ON recent (received_at);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, task TEXT NOT NULL, text TEXT NOT NULL,
    label TEXT, fields TEXT, result_id TEXT, agreed INTEGER, source TEXT NOT NULL
);
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    topic      TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL NOT NULL,
    dead       INTEGER NOT NULL DEFAULT 0,
    payload    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at);
""" + _SIDE_TABLES
# Version 1 had no `dead` column (opening one adds it, at the end: SQLite's ALTER TABLE cannot insert it) and
# none of the side tables.
_MIGRATE_1_TO_2 = "ALTER TABLE outbox ADD COLUMN dead INTEGER NOT NULL DEFAULT 0;" + _SIDE_TABLES
_COLUMNS = {1: {"seq", "id", "topic", "size", "created_at", "payload"},
            2: {"seq", "id", "topic", "size", "created_at", "dead", "payload"}}
_MAX_SEQ = 2**63 - 1
_SIBLINGS = ("", "-wal", "-shm")
_CHUNK = 500  # host parameters per IN (...) list; old SQLite builds cap them at 999

# Gateways without a battery-backed clock boot near 1970 and stamp rows with that until NTP syncs. No
# row written by this release can truly be older than this (2025-01-01 UTC; systemd keeps a similar
# floor, TIME_EPOCH): a created_at below it, or a clock reading below it, is an unset clock, not an age.
PLAUSIBLE_AFTER = 1_735_689_600.0

# The wall clock moved this much more (or less) than the monotonic clock between two readings: a step (NTP
# after an outage, an operator's `date -s`, a wrong RTC corrected), not time that passed. NTP slews small
# errors at most 500 ppm, far below this.
STEP_TOLERANCE_S = 60.0

# Opening is retried only while another process holds the file locked (a backup, an operator's sqlite3
# shell). Module-level so tests can shorten them.
OPEN_ATTEMPTS = 4
BUSY_TIMEOUT_S = 2.0


# The row format is this module's alone: a row's `topic` column holds the MQTT topic, prefixed with U+0000
# when the sink is to publish it retained. U+0000 is never in an MQTT topic (MQTT 5 §1.5.4), so the mark cannot
# clash with a real topic, and the schema needs no column for a rare flag. Writers mark with `retained()`;
# every reader (the sink through `batch`, `edge-agent outbox` through `admin`) gets it back as Record.retain.
_RETAIN = "\0"


def retained(topic: str) -> str:
    """The row topic for a row the sink publishes with the retain flag."""
    return _RETAIN + topic


def split_retain(stored: str) -> tuple[str, bool]:
    """(topic, retain) from a row's topic column."""
    return (stored[1:], True) if stored.startswith(_RETAIN) else (stored, False)


def _sync_dir_names(directory: Path) -> None:
    """fsync the outbox's directory and every directory above it, up to its filesystem's mount point.

    POSIX makes a new name durable only when the directory holding it is fsynced. SQLite syncs the
    outbox's own directory when it creates the -wal, but nothing synced the directories above it: on a
    fresh gateway, where the daemon (or OutboxLock) has just made the outbox directory, a power cut
    could take the whole directory, committed and acked rows included (tests/power found exactly that:
    every row committed before the first cut gone). Before the first commit, then, the path down to the
    outbox is made durable: a few fsyncs, once per open. A filesystem that cannot fsync a directory
    (EINVAL on some) or a level we may not open is skipped: this is a best effort on top of SQLite's own.
    """
    d = directory.resolve()
    while True:
        with suppress(OSError):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if d == d.parent or os.path.ismount(d):
            return
        d = d.parent


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    id: str
    topic: str  # the MQTT topic, retain mark removed
    payload: bytes
    created_at: float
    retain: bool = False

    @classmethod
    def from_row(cls, seq: int, rid: str, stored_topic: str, payload: bytes, created_at: float) -> Record:
        topic, retain = split_retain(stored_topic)
        return cls(seq, rid, topic, payload, created_at, retain)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    count: int
    bytes: int
    oldest_created_at: float | None
    added: int  # counters below are since open()
    accepted: int
    dropped: int
    corrupt_files: int
    path: Path
    dropped_max_bytes: int = 0  # the split of `dropped` by the bound that dropped them
    dropped_max_age: int = 0
    dropped_dead_letter_max_bytes: int = 0
    dead_letters: int = 0  # dead-letter rows among `count`, and their bytes among `bytes`
    dead_letter_bytes: int = 0
    files_lost: int = 0  # times the file was deleted or replaced under us (and recreated, rows kept)


class _CorruptFile(Exception):
    """The file is not a usable outbox: move it aside, never delete it."""


class Outbox:
    def __init__(self, cfg: OutboxConfig, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None) -> None:
        self._cfg = cfg
        self._path = Path(cfg.path)
        self._clock = clock
        # Ages count monotonic time within a run. A wall clock given without a monotonic one (tests that move a
        # fake clock to stand for time passing) is trusted as is.
        self._monotonic = monotonic if monotonic is not None else (time.monotonic if clock is time.time else None)
        self._reading: tuple[float, float] | None = None  # (wall, monotonic) at the last stamp or expiry
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # Kept in memory so that the bound check in put_many costs nothing; recomputed at open().
        self._count = self._bytes = self._max_seq = self._dead = self._dead_bytes = self._recent_bytes = 0
        self._added = self._accepted = self._dropped = self._corrupt_files = 0
        self._dropped_bytes = self._dropped_age = self._dropped_dead = 0
        self._clock_unset_logged = False
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened
        self._files_lost = 0

    def open(self) -> Outbox:
        with self._lock:
            if self._conn is not None:
                return self
            self._added = self._accepted = self._dropped = self._corrupt_files = 0
            self._dropped_bytes = self._dropped_age = self._dropped_dead = 0
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutboxError(f"outbox.path: cannot create outbox directory {self._path.parent}: {e.strerror}"
                                  ) from e
            _sync_dir_names(self._path.parent)
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(TransientError),
                stop=tenacity.stop_after_attempt(OPEN_ATTEMPTS),
                wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
                before_sleep=lambda rs: log.warning("outbox.locked", path=str(self._path), attempt=rs.attempt_number),
                reraise=True,
            )
            try:
                conn = retrying(self._connect_or_quarantine)
            except TransientError as e:
                raise OutboxError(f"outbox {self._path} stayed locked by another process: {e}") from e
            self._conn = conn
            self._file_id = self._identity()
        return self

    def check_file(self) -> bool:
        """True while the file at the outbox's path is the one we have open. When it was deleted (an operator's
        `rm`, a cleanup script) or replaced under the running daemon, the rows would live on only in an
        unlinked inode, invisible to `outbox stats`, and be gone at the next start: log it, count it, and
        recreate the file at the path with every row we hold (same seqs, so the sink's cursors stay right).
        A file put in our place is moved aside as `<outbox>.replaced-<UTC time>`, never deleted."""
        with self._lock:
            conn = self._require_open()
            try:
                found = self._identity()
            except OSError as e:
                log.warning("outbox.check_failed", path=str(self._path), error=e.strerror)
                return True  # cannot tell (EIO, EACCES): keep going, try again next time
            if found == self._file_id:
                return True
            how = "deleted" if found is None else "replaced"
            self._files_lost += 1
            log.error("outbox.file_lost", path=str(self._path), how=how, rows=self._count,
                      hint="recreated at the same path with the rows the daemon held; stop the daemon before "
                           "removing or restoring the outbox (edge-agent outbox purge deletes rows safely)")
            self._recreate(conn, how)
            return False


    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the last connection to close checkpoints the WAL into the main file
                self._conn = None

    def __enter__(self) -> Outbox:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def put_many(self, rows: Sequence[tuple[str, str, bytes]], dead: Sequence[tuple[str, str, bytes]] = (), *,
                 recent: Sequence[tuple[str, float, bytes]] = (), meta: Mapping[str, str] | None = None,
                 feedback: Sequence[tuple] = (), feedback_max_rows: int = 100_000) -> int:
        """Append (id, topic, payload) results and dead letters in ONE transaction; return the last seq assigned.
        `recent` (id, received_at, payload) results are kept for the digest, and `meta` values set, in the
        same transaction.

        The caller may ack the inbound messages as soon as this returns: the rows are on disk
        (WAL + synchronous=FULL). One commit per batch is what makes this fast. Beyond `max_bytes` the
        oldest results are dropped, beyond `dead_letter_max_bytes` the oldest dead letters: a flood of bad
        input never evicts a result. With no rows, nothing is written and the current max_seq is returned.
        """
        if not rows and not dead and not recent and not meta and not feedback:
            return self.max_seq()
        with self._lock:
            conn = self._require_open()
            now, step, mono = self._read_clock()
            params = [(rid, topic, len(payload) + len(topic.encode()), now, int(is_dead), payload)
                      for is_dead, batch in ((False, rows), (True, dead)) for rid, topic, payload in batch]
            added_dead = sum(p[2] for p in params[len(rows):])
            added_results = sum(p[2] for p in params[: len(rows)])
            results_bytes = self._bytes - self._dead_bytes
            with self._transaction(conn, "append"):
                moved = self._restamp(conn, step)
                if params:
                    conn.executemany(
                        "INSERT INTO outbox (id, topic, size, created_at, dead, payload) VALUES (?,?,?,?,?,?)", params
                    )
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0] if params else self._max_seq
                if recent:  # a redelivered input has the same id: its result is kept once
                    conn.executemany("INSERT OR REPLACE INTO recent (id, received_at, payload) VALUES (?,?,?)", recent)
                    kept_bytes = self._recent_bytes + sum(len(r[2]) for r in recent)
                    while kept_bytes > self._cfg.recent_max_bytes:  # the oldest kept results go first
                        n, freed = conn.execute(
                            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM (SELECT payload FROM recent "
                            "ORDER BY received_at LIMIT 256)").fetchone()
                        conn.execute("DELETE FROM recent WHERE id IN (SELECT id FROM recent ORDER BY received_at "
                                     "LIMIT 256)")
                        kept_bytes -= freed
                        if not n:
                            break
                if feedback:
                    conn.executemany("INSERT INTO feedback (received_at, task, text, label, fields, result_id, "
                                     "agreed, source) VALUES (?,?,?,?,?,?,?,?)", feedback)
                    conn.execute("DELETE FROM feedback WHERE seq <= (SELECT MAX(seq) FROM feedback) - ?",
                                 (feedback_max_rows,))
                for key, value in (meta or {}).items():
                    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                                 "value = excluded.value", (key, value))
                dropped, freed = self._trim_oldest(conn, results_bytes + added_results - self._cfg.max_bytes, dead=0)
                dropped_dead, freed_dead = self._trim_oldest(
                    conn, self._dead_bytes + added_dead - self._cfg.dead_letter_max_bytes, dead=1
                )
            # Committed: only now may the in-memory view move, so a failed commit leaves it exact.
            self._count += len(params) - dropped - dropped_dead
            self._bytes += added_results + added_dead - freed - freed_dead
            self._dead += len(dead) - dropped_dead
            self._dead_bytes += added_dead - freed_dead
            self._added += len(params)
            self._dropped += dropped + dropped_dead
            self._dropped_bytes += dropped
            self._dropped_dead += dropped_dead
            self._max_seq = last
            if recent:
                self._recent_bytes = kept_bytes
            self._reading = (now, mono)  # only once the restamp is committed: a failed one is retried
        if step:
            self._log_step(step, moved)
        if dropped:
            log.warning("outbox.dropped", count=dropped, reason="max_bytes", max_bytes=self._cfg.max_bytes)
        if dropped_dead:
            log.warning("outbox.dropped", count=dropped_dead, reason="dead_letter_max_bytes",
                        dead_letter_max_bytes=self._cfg.dead_letter_max_bytes)
        return last

    def expire(self) -> int:
        """Drop rows older than max_age_s (by created_at against the clock); return how many.

        A clock jump must never drop a row early. While the clock reads before PLAUSIBLE_AFTER it is
        unset (no RTC, no NTP yet): nothing expires. Once it is plausible, rows stamped by the unset
        clock get "now" as their created_at, so their age counts from the first trustworthy reading
        (never early; at worst max_age_s late). Rows stamped after a backward jump sit in the future
        and are younger than any cutoff, so they stay.

        Within a run a step of the clock (a reading that moved more than STEP_TOLERANCE_S away from the time
        the monotonic clock says passed, e.g. 40 days ahead) moves every row's created_at by the same step,
        so ages keep counting real time and nothing expires early or late for it (`outbox.clock_step`).
        """
        with self._lock:
            conn = self._require_open()
            now, step, mono = self._read_clock()
            if step:
                with self._transaction(conn, "restamp"):
                    moved = self._restamp(conn, step)
                self._log_step(step, moved)
            self._reading = (now, mono)
        if now < PLAUSIBLE_AFTER:
            if not self._clock_unset_logged:
                self._clock_unset_logged = True
                log.warning("outbox.clock_unset", now=now, hint="no rows expire by age until the clock is set")
            return 0
        cutoff = now - self._cfg.max_age_s
        with self._lock:
            conn = self._require_open()
            with self._transaction(conn, "expire"):
                restamped = conn.execute(
                    "UPDATE outbox SET created_at = ? WHERE created_at < ?", (now, PLAUSIBLE_AFTER)
                ).rowcount
                n, freed, n_dead, freed_dead = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(dead), 0), COALESCE(SUM(size * dead), 0) "
                    "FROM outbox WHERE created_at < ?", (cutoff,)
                ).fetchone()
                conn.execute("DELETE FROM outbox WHERE created_at < ?", (cutoff,))
            self._count -= n
            self._bytes -= freed
            self._dead -= n_dead
            self._dead_bytes -= freed_dead
            self._dropped += n
            self._dropped_age += n
        if restamped:
            log.warning("outbox.clock_restamped", count=restamped, reason="stamped before the clock was set")
        if n:
            log.warning("outbox.dropped", count=n, reason="max_age", max_age_s=self._cfg.max_age_s)
        return n

    def batch(self, n: int, after_seq: int = 0, up_to_seq: int | None = None) -> list[Record]:
        """Up to n rows with after_seq < seq <= up_to_seq, oldest first. Reading removes nothing."""
        if n <= 0:
            return []
        hi = _MAX_SEQ if up_to_seq is None else up_to_seq
        with self._lock:
            rows = self._require_open().execute(
                "SELECT seq, id, topic, payload, created_at FROM outbox "
                "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (after_seq, hi, n)
            ).fetchall()
        return [Record.from_row(*r) for r in rows]

    def accept(self, seqs: Iterable[int]) -> int:
        """Delete rows the uplink broker acknowledged; return how many existed. Unknown seqs (already
        accepted, or dropped by a bound while in flight) are ignored, so accepting twice is harmless."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        n = freed = n_dead = freed_dead = 0
        with self._lock:
            conn = self._require_open()
            # A delete need not reach the disk before we go on: the next FULL commit syncs the WAL up to
            # here, and a delete lost to power failure only re-sends a row (at-least-once allows it).
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction(conn, "accept"):
                    for i in range(0, len(wanted), _CHUNK):
                        chunk = wanted[i : i + _CHUNK]
                        marks = ",".join("?" * len(chunk))
                        c, s, cd, sd = conn.execute(
                            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(dead), 0), "
                            f"COALESCE(SUM(size * dead), 0) FROM outbox WHERE seq IN ({marks})", chunk
                        ).fetchone()
                        if c:
                            conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
                        n, freed, n_dead, freed_dead = n + c, freed + s, n_dead + cd, freed_dead + sd
            finally:
                conn.execute("PRAGMA synchronous=FULL")
            self._count -= n
            self._bytes -= freed
            self._dead -= n_dead
            self._dead_bytes -= freed_dead
            self._accepted += n
        return n

    def recent_between(self, start: float, end: float) -> list[bytes]:
        """Payloads of the results kept (put_many's `recent`) whose input arrived in [start, end), in order."""
        with self._lock:
            rows = self._require_open().execute(
                "SELECT payload FROM recent WHERE received_at >= ? AND received_at < ? ORDER BY received_at, id",
                (start, end),
            ).fetchall()
        return [r[0] for r in rows]

    def corrections(self, task: str) -> list[tuple[str, str]]:
        """(text, label) of the label corrections received for a task, oldest first."""
        with self._lock:
            return [tuple(r) for r in self._require_open().execute(
                "SELECT text, label FROM feedback WHERE task = ? AND label IS NOT NULL ORDER BY seq", (task,))]

    def get_recent(self, result_id: str) -> bytes | None:
        """The payload of a kept result, by its id."""
        with self._lock:
            row = self._require_open().execute("SELECT payload FROM recent WHERE id = ?", (result_id,)).fetchone()
        return None if row is None else row[0]

    def trim_recent(self, before: float) -> int:
        """Forget kept results whose input arrived before `before`; return how many."""
        with self._lock:
            conn = self._require_open()
            conn.execute("PRAGMA synchronous=NORMAL")  # losing a trim to power loss only keeps a row longer
            try:
                with self._transaction(conn, "trim"):
                    freed = conn.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM recent WHERE received_at < ?",
                                         (before,)).fetchone()[0]
                    n = conn.execute("DELETE FROM recent WHERE received_at < ?", (before,)).rowcount
                self._recent_bytes -= freed
                return n
            finally:
                conn.execute("PRAGMA synchronous=FULL")

    def get_meta(self, key: str) -> str | None:
        """A value of the daemon's own state kept in the outbox file (None when never set)."""
        with self._lock:
            row = self._require_open().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Set a state value, durably (synchronous=FULL), before this returns."""
        with self._lock:
            conn = self._require_open()
            with self._transaction(conn, "meta"):
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                             "excluded.value", (key, value))

    def max_seq(self) -> int:
        """Highest seq ever assigned (0 for a new outbox); seqs are never reused, even after deletes."""
        with self._lock:
            self._require_open()
            return self._max_seq

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = self._require_open().execute("SELECT MIN(created_at) FROM outbox").fetchone()[0]
            return OutboxStats(self._count, self._bytes, oldest, self._added, self._accepted,
                               self._dropped, self._corrupt_files, self._path, self._dropped_bytes, self._dropped_age,
                               self._dropped_dead, self._dead, self._dead_bytes, self._files_lost)

    # -- internals (callers hold self._lock) -------------------------------------------------------

    def _read_clock(self) -> tuple[float, float, float]:
        """(wall clock now, its step since the last committed reading or 0.0 when it did not step, monotonic
        now). The caller stores (now, monotonic) as the reading once its transaction has committed."""
        now = self._clock()
        if self._monotonic is None:
            return now, 0.0, 0.0
        mono = self._monotonic()
        if self._reading is None:
            return now, 0.0, mono
        step = (now - self._reading[0]) - (mono - self._reading[1])
        return now, (step if abs(step) > STEP_TOLERANCE_S else 0.0), mono

    @staticmethod
    def _restamp(conn: sqlite3.Connection, step: float) -> int:
        """Move every row's created_at by the clock's step (inside the caller's transaction)."""
        if not step:
            return 0
        return conn.execute("UPDATE outbox SET created_at = created_at + ?", (step,)).rowcount

    @staticmethod
    def _log_step(step: float, moved: int) -> None:
        log.warning("outbox.clock_step", step_s=round(step, 3), rows_restamped=moved,
                    hint="the wall clock stepped; row ages count the time that really passed")

    def _identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file now at the path (symlinks followed), None when there is none."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _recreate(self, conn: sqlite3.Connection, how: str) -> None:
        """Copy the open database (the lost inode, WAL included) to a new file at the path, then reopen it.

        Order matters: SQLite deletes `<path>-wal` by name when its last connection closes, so the old
        connection is closed before anything of ours appears under the path again."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        tmp = self._path.with_name(f"{self._path.name}.recover-{stamp}")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if how == "replaced":
                aside = self._path.with_name(f"{self._path.name}.replaced-{stamp}")
                self._path.rename(aside)
                log.error("outbox.moved_aside", path=str(self._path), moved_to=str(aside))
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.backup(copy)  # a consistent snapshot: every committed row, seqs and sqlite_sequence kept
            finally:
                copy.close()
        except (OSError, sqlite3.Error) as e:
            raise OutboxError(f"outbox {self._path} was {how} and cannot be recreated: {e}") from e
        conn.close()
        self._conn = None
        os.replace(tmp, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name survives a power cut
        finally:
            os.close(dir_fd)
        self._conn = self._connect_or_quarantine()
        self._file_id = self._identity()
        log.warning("outbox.recreated", path=str(self._path), rows=self._count, max_seq=self._max_seq)

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self._path} is not open")
        return self._conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so a busy file fails at BEGIN, not halfway through.
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise OutboxError(f"outbox {what} failed at {self._path}: {e}") from e
            raise

    @staticmethod
    def _trim_oldest(conn: sqlite3.Connection, excess: int, *, dead: int) -> tuple[int, int]:
        """Delete the oldest rows of one kind (results: dead=0, dead letters: 1), by seq, until `excess`
        bytes are freed; return (rows, bytes)."""
        n = freed = last = 0
        while freed < excess:
            page = conn.execute(
                "SELECT seq, size FROM outbox WHERE seq > ? AND dead = ? ORDER BY seq LIMIT 256", (last, dead)
            ).fetchall()
            if not page:
                break
            for seq, size in page:
                n, freed, last = n + 1, freed + size, seq
                if freed >= excess:
                    break
        if n:
            conn.execute("DELETE FROM outbox WHERE seq <= ? AND dead = ?", (last, dead))
        return n, freed

    def _connect_or_quarantine(self) -> sqlite3.Connection:
        # Judge an existing file through a read-only connection: closing a read-write one would
        # checkpoint its WAL into the damaged file and delete the -wal, destroying the evidence we keep.
        if self._path.exists():
            probe = self._sqlite(readonly=True)
            try:
                self._run(probe, self._check)
            except _CorruptFile as e:  # _run has closed the probe, so nothing holds the file now
                self._quarantine(str(e))
            else:
                probe.close()
        conn = self._sqlite(readonly=False)
        try:
            self._run(conn, self._prepare)
        except _CorruptFile as e:  # passed the probe, then failed: do not loop on it
            raise OutboxError(f"outbox {self._path} is unusable: {e}") from e
        return conn

    def _sqlite(self, *, readonly: bool) -> sqlite3.Connection:
        target = self._path.resolve().as_uri() + "?mode=ro" if readonly else str(self._path)
        try:
            return sqlite3.connect(target, uri=readonly, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise self._classify(e) from e

    def _run(self, conn: sqlite3.Connection, step: Callable[[sqlite3.Connection], None]) -> None:
        try:
            step(conn)
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise self._classify(e) from e
            raise

    def _version(self, conn: sqlite3.Connection) -> int:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # garbage fails here: SQLITE_NOTADB
        if version > SCHEMA_VERSION:
            raise OutboxError(f"outbox {self._path} has schema version {version}, newer than this edge-agent "
                              f"knows ({SCHEMA_VERSION}); refusing to touch it (downgrade?)")
        return version

    def _check(self, conn: sqlite3.Connection) -> None:
        version = self._version(conn)
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]  # reads every page: O(size)
        if problems != ["ok"]:
            raise _CorruptFile("quick_check: " + "; ".join(problems))
        columns = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
        if (version or columns) and columns != _COLUMNS.get(version or SCHEMA_VERSION):
            raise _CorruptFile(f"unusable schema: outbox table has columns {sorted(columns)}")

    def _prepare(self, conn: sqlite3.Connection) -> None:
        version = self._version(conn)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise OutboxError(f"outbox {self._path}: the filesystem does not support WAL (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")  # a commit that returned survives power loss
        if version == 0:  # a new file
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version == 1:  # step by step from here, each step one transaction
            conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_1_TO_2} PRAGMA user_version = 2; COMMIT;")
            log.info("outbox.migrated", path=str(self._path), schema_from=1, schema_to=2)
        self._recent_bytes = conn.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM recent").fetchone()[0]
        self._count, self._bytes, self._dead, self._dead_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(dead), 0), COALESCE(SUM(size * dead), 0) "
            "FROM outbox"
        ).fetchone()
        # sqlite_sequence keeps the high-water mark even when every row has been deleted.
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._max_seq = row[0] if row else 0

    def _classify(self, e: sqlite3.Error) -> Exception:
        code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF  # primary code, extended bits dropped
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return TransientError(f"outbox {self._path}: {e}")
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return _CorruptFile(str(e))
        return OutboxError(f"cannot open outbox {self._path}: {e}")

    def _quarantine(self, reason: str) -> None:
        """Rename the file and its -wal/-shm siblings aside (kept for forensics) and log loudly."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        k, base = 0, self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        while any(Path(f"{base}{s}").exists() for s in _SIBLINGS):  # never rename over an earlier one
            k += 1
            base = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{k}")
        # Siblings keep SQLite's naming (<db>-wal) so the moved set still opens together.
        for suffix in _SIBLINGS:
            src = Path(f"{self._path}{suffix}")
            if src.exists():
                try:
                    src.rename(f"{base}{suffix}")
                except OSError as e:
                    msg = f"outbox {src} is corrupt ({reason}) and cannot be moved aside: {e.strerror}"
                    raise OutboxError(msg) from e
        self._corrupt_files += 1
        log.error("outbox.corrupt", path=str(self._path), moved_to=str(base), reason=reason)
