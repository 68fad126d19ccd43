"""The daemon's exclusive lock on its outbox file, so that only one process ever writes it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import ConfigError, OutboxError


def lock_path(db_path: Path) -> Path:
    """`<outbox>.lock` beside the outbox's real path: one lock whatever name the outbox is reached by."""
    return Path(f"{Path(db_path).resolve()}.lock")


class OutboxLock:
    """An exclusive lock on `<outbox>.lock`, held by the running daemon for its whole life.

    It keeps a second daemon off the same outbox and lets `edge-agent outbox purge` refuse while the
    daemon runs. flock, not SQLite's own locking: SQLite locks only for the length of a transaction.
    The kernel drops the lock when the holder dies, so a SIGKILLed daemon leaves no stale lock behind.

    The lock file sits beside the outbox's real path (symlinks resolved, the directory's included), so two
    names for one file (a symlink to the outbox or to its directory, a relative path) take one lock. A hard
    link cannot be resolved by name: an outbox file with more than one link is refused, since SQLite's -wal
    and -shm files go by name too and two names would corrupt it.
    """

    def __init__(self, db_path: Path) -> None:
        self._db = Path(db_path)
        self.path = lock_path(self._db)
        self._fd: int | None = None

    def acquire(self) -> OutboxLock:
        """Take the lock or raise OutboxError naming the holder's pid."""
        try:
            self._db.parent.mkdir(parents=True, exist_ok=True)
            self.path = lock_path(self._db)  # again: the directory may only exist (as a symlink's target) now
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:  # the parent is a file, a read-only filesystem, no permission
            raise ConfigError(
                "outbox.path",
                f"cannot create the lock file {self.path} beside the outbox {self._db}: {e.strerror or e}",
                "point outbox.path at a file in a writable directory (the daemon's StateDirectory under systemd)",
            ) from None
        try:
            links = os.stat(self._db).st_nlink
        except OSError:
            links = 1  # no outbox yet
        if links > 1:
            os.close(fd)
            raise ConfigError("outbox.path", f"the outbox {self._db} has {links} hard links",
                              "keep one name for the outbox file (SQLite's -wal and -shm go by name)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutboxError(f"outbox {str(self.path).removesuffix('.lock')} is in use by a running edge-agent "
                              f"(pid {holder}); stop the daemon first") from None
        if created and os.geteuid() == 0:  # an operator's `outbox purge` as root: leave it usable by the daemon
            owner = self.path.parent.stat()
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def holder(db_path: Path) -> str | None:
        """The pid (as written) of the process holding the lock, or None when nobody does. Only probes:
        never creates the file, so an operator's read-only command leaves no root-owned file behind."""
        try:
            fd = os.open(lock_path(db_path), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # drops our probe lock, if we got it
        return None

    def check(self) -> bool:
        """True while the lock file at our path is the one we hold. Deleted (with the outbox's directory, say),
        a second daemon or a purge would find no lock and go ahead: take the lock again on a new file. Raises
        OutboxError when another process took it meanwhile (we keep the old one)."""
        if self._fd is None:
            return True
        held = os.fstat(self._fd)
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return True
        except FileNotFoundError:
            pass
        old, self._fd = self._fd, None
        try:
            self.acquire()
        except BaseException:
            self._fd = old
            raise
        os.close(old)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None

    def __enter__(self) -> OutboxLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()
