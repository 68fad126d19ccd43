"""A FUSE filesystem that forgets, on a simulated power cut, everything that was never made durable.

Modelled on Jepsen's LazyFS, in Python (mfusepy, libfuse 3), small enough to read in one sitting:

    python -m tests.power.lazyfs BACKING MOUNTPOINT CONTROL_SOCKET

Every operation is passed through to BACKING at once, so the processes using MOUNTPOINT see an ordinary
filesystem (the "page cache" view). Beside it this process keeps, in memory, what a disk would still hold
after losing power: the *durable* image. What moves into it, and when (the POSIX rules, read strictly):

- file data and size: a write() or truncate() is *pending* until fsync()/fdatasync() of that file; the
  pending operations of that file are then applied to its durable copy, in order. Nothing else syncs
  data: not close(), not another file's fsync, not a directory's.
- names: create, mkdir, unlink, rmdir and rename become durable only when the directory that holds the
  name is fsynced; that directory's durable listing then becomes its current listing (both directories
  of a rename need it). A file whose name is durable but whose data never was comes back empty, as on
  a real filesystem after a crash. (Linux filesystems are often kinder, for example ext4 commits a new
  name together with a later fsync of the file; POSIX promises neither, and neither does this one.)
- mmap'd files (SQLite's -shm) follow the same rules: the kernel's writeback reaches us as write().

A power cut is asked for over CONTROL_SOCKET, one JSON object per line, answered by one line:

- {"op": "cut"}: freeze now. From this instant every operation fails with EIO, so nothing can become
  durable any more; the reply reports what was pending (the unsynced bytes per file, the directories
  with unsynced names).
- {"op": "arm", "name": "outbox.db-wal", "nth": 3}: freeze on the 3rd write() to a file of that name from
  now on (that write is pending, so it is lost too): a cut in the middle of a commit or a checkpoint.
- {"op": "wait", "timeout": 5}: block until a frozen state (an armed trap fired) or the timeout;
  replies with the report, or {"frozen": false}.
- {"op": "stats"}: per-file counters (writes, fsyncs), for the test's own accounting.
- {"op": "torn", "p": 0.5}: on the cut, keep each pending write with probability p (in its order)
  instead of dropping them all: a disk cache that had flushed some of what it was given. Default 0.

Once the filesystem is unmounted (``fusermount3 -u``) after a cut, this process rewrites BACKING to the
durable image (the disk "after the reboot") and exits; the next mount starts from that image, taking all
of it as durable. Unmounted without a cut, BACKING is left as it is.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import mfusepy as fuse

_ST_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize")


class _Frozen(Exception):
    pass


class LazyFS(fuse.Operations):
    use_ns = True

    def __init__(self, backing: str, seed: int = 0) -> None:
        self.root = os.path.realpath(backing)
        self._mu = threading.RLock()
        self.rnd = random.Random(seed)
        self.frozen = False
        self.report: dict[str, Any] | None = None
        self.frozen_event = threading.Event()
        self.torn_p = 0.0
        self.trap: list | None = None  # [file name, writes left before the cut, nth]
        # Identity: our own file ids, so that the durable image never depends on inode numbers (which the
        # backing filesystem reuses) nor on names (which renames change).
        self._next = 0
        self.ino_fid: dict[int, int] = {}
        self.fh_fid: dict[int, int] = {}
        self.names: dict[int, str] = {}  # fid -> last known path, for reports
        # The durable image: directory listings, file contents, modes.
        self.d_dirs: dict[int, dict[str, int]] = {}
        self.d_data: dict[int, bytearray] = {}
        self.d_mode: dict[int, int] = {}
        # What is not durable yet.
        self.pending: dict[int, list[tuple]] = {}  # fid -> [("w", off, bytes) | ("t", size)]
        self.dirty_dirs: set[int] = set()
        self.counts: dict[str, dict[str, int]] = {}
        self._load()

    # -- identity and the durable image -----------------------------------------------------------

    def _fid(self, real: str, st: os.stat_result | None = None) -> int:
        st = st or os.lstat(real)
        fid = self.ino_fid.get(st.st_ino)
        if fid is None:
            fid = self.ino_fid[st.st_ino] = self._next
            self._next += 1
            self.d_mode.setdefault(fid, stat.S_IMODE(st.st_mode) | (stat.S_IFDIR if stat.S_ISDIR(st.st_mode)
                                                                    else stat.S_IFREG))
        self.names[fid] = real
        return fid

    def _load(self) -> None:
        """At mount, everything in BACKING is durable: it is what the disk held at power-on."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dfid = self._fid(dirpath)
            listing = {}
            for name in dirnames + filenames:
                real = os.path.join(dirpath, name)
                fid = listing[name] = self._fid(real)
                if name in filenames:
                    self.d_data[fid] = bytearray(Path(real).read_bytes())
            self.d_dirs[dfid] = listing

    def rebuild(self) -> dict[str, int]:
        """After the cut: make BACKING hold exactly the durable image (the disk after the reboot)."""
        for entry in os.listdir(self.root):
            p = os.path.join(self.root, entry)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        written = {"files": 0, "dirs": 0, "bytes": 0}
        root_fid = self.ino_fid[os.lstat(self.root).st_ino]

        def make(dfid: int, path: str, depth: int) -> None:
            for name, fid in self.d_dirs.get(dfid, {}).items():
                p = os.path.join(path, name)
                if stat.S_ISDIR(self.d_mode.get(fid, stat.S_IFREG)):
                    if depth > 64:
                        continue
                    os.mkdir(p, stat.S_IMODE(self.d_mode[fid]) or 0o755)
                    written["dirs"] += 1
                    make(fid, p, depth + 1)
                else:
                    data = bytes(self.d_data.get(fid, b""))
                    with open(p, "wb") as f:
                        f.write(data)
                    os.chmod(p, stat.S_IMODE(self.d_mode.get(fid, 0o644)) or 0o644)
                    written["files"] += 1
                    written["bytes"] += len(data)

        make(root_fid, self.root, 0)
        return written

    def _apply(self, fid: int, ops: list[tuple]) -> None:
        buf = self.d_data.setdefault(fid, bytearray())
        for op in ops:
            if op[0] == "t":
                size = op[1]
                if size < len(buf):
                    del buf[size:]
                else:
                    buf.extend(b"\0" * (size - len(buf)))
            else:
                _, off, data = op
                if off > len(buf):
                    buf.extend(b"\0" * (off - len(buf)))
                buf[off : off + len(data)] = data

    def _pend(self, fid: int, op: tuple) -> None:
        ops = self.pending.setdefault(fid, [])
        if op[0] == "w":  # the same range rewritten (the -shm pages, over and over): keep only the newest
            for i in range(len(ops) - 1, -1, -1):
                if ops[i][0] == "t":
                    break
                if ops[i][1] == op[1] and len(ops[i][2]) == len(op[2]):
                    del ops[i]
                    break
        ops.append(op)

    def _freeze(self, trigger: str) -> dict[str, Any]:
        """The power cut. Callers hold self._mu."""
        if self.frozen:
            assert self.report is not None
            return self.report
        self.frozen = True
        unsynced: dict[str, int] = {}
        kept: dict[str, int] = {}
        for fid, ops in self.pending.items():
            name = os.path.basename(self.names.get(fid, f"#{fid}"))
            nbytes = sum(len(op[2]) for op in ops if op[0] == "w") + sum(1 for op in ops if op[0] == "t")
            if not nbytes:
                continue
            unsynced[name] = unsynced.get(name, 0) + nbytes
            if self.torn_p > 0:  # a disk cache that wrote part of what it held, in no promised order
                survivors = [op for op in ops if self.rnd.random() < self.torn_p]
                self._apply(fid, survivors)
                kept[name] = kept.get(name, 0) + len(survivors)
        self.pending.clear()
        self.report = {
            "frozen": True,
            "trigger": trigger,
            "unsynced_bytes": unsynced,
            "torn_kept_ops": kept,
            "unsynced_dirs": sorted(os.path.relpath(self.names.get(d, "?"), self.root) for d in self.dirty_dirs),
        }
        self.frozen_event.set()
        return self.report

    # -- helpers --------------------------------------------------------------------------------------

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _enter(self) -> None:
        if self.frozen:
            raise fuse.FuseOSError(errno.EIO)

    def _count(self, fid: int, what: str) -> None:
        name = os.path.basename(self.names.get(fid, "?"))
        c = self.counts.setdefault(name, {})
        c[what] = c.get(what, 0) + 1

    def _dirty_parent(self, path: str) -> None:
        self.dirty_dirs.add(self._fid(os.path.dirname(self._real(path).rstrip("/")) or self.root))

    # -- control socket --------------------------------------------------------------------------------

    def control(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "wait":
            self.frozen_event.wait(float(msg.get("timeout", 10)))
        with self._mu:
            if op == "cut":
                return self._freeze("now")
            if op == "arm":
                self.trap = [str(msg["name"]), int(msg["nth"]), int(msg["nth"])]
                return {"armed": True}
            if op == "disarm":
                self.trap = None
                return {"armed": False}
            if op == "torn":
                self.torn_p = float(msg["p"])
                return {"torn": self.torn_p}
            if op == "wait":
                return self.report if self.frozen else {"frozen": False}
            if op == "stats":
                return {"counts": self.counts, "frozen": self.frozen}
        return {"error": f"unknown op {op!r}"}

    # -- the filesystem -----------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._mu:
            self._enter()
            st = os.fstat(fh) if fh is not None and fh in self.fh_fid else os.lstat(self._real(path))
        d = {k: getattr(st, k) for k in _ST_KEYS}
        d.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return d

    def access(self, path: str, amode: int) -> int:
        with self._mu:
            self._enter()
            if not os.access(self._real(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._mu:
            self._enter()
            return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, Any]:
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        with self._mu:
            self._enter()
            os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        with self._mu:
            self._enter()
            os.chown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self._mu:
            self._enter()
            os.utime(self._real(path), ns=times) if times else os.utime(self._real(path))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._mu:
            self._enter()
            os.mkdir(self._real(path), mode)
            self._fid(self._real(path))
            self._dirty_parent(path)
        return 0

    def rmdir(self, path: str) -> int:
        with self._mu:
            self._enter()
            os.rmdir(self._real(path))
            self._dirty_parent(path)
        return 0

    def unlink(self, path: str) -> int:
        with self._mu:
            self._enter()
            real = self._real(path)
            st = os.lstat(real)
            os.unlink(real)
            if st.st_nlink <= 1:  # the backing fs may hand this inode number to a new file now
                self.ino_fid.pop(st.st_ino, None)
            self._dirty_parent(path)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._mu:
            self._enter()
            if flags:
                raise fuse.FuseOSError(errno.EINVAL)
            real_new = self._real(new)
            try:
                replaced = os.lstat(real_new)
            except FileNotFoundError:
                replaced = None
            os.rename(self._real(old), real_new)
            if replaced is not None and replaced.st_nlink <= 1 and not stat.S_ISDIR(replaced.st_mode):
                self.ino_fid.pop(replaced.st_ino, None)
            self._fid(real_new)
            self._dirty_parent(old)
            self._dirty_parent(new)
        return 0

    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        with self._mu:
            self._enter()
            real = self._real(path)
            existed = os.path.exists(real)
            fh = os.open(real, (flags & ~os.O_EXCL) | os.O_CREAT, mode)
            fid = self.fh_fid[fh] = self._fid(real, os.fstat(fh))
            if not existed:
                self._dirty_parent(path)
            elif flags & os.O_TRUNC:
                self._pend(fid, ("t", 0))
        return fh

    def open(self, path: str, flags: int) -> int:
        with self._mu:
            self._enter()
            real = self._real(path)
            fh = os.open(real, flags & ~(os.O_CREAT | os.O_EXCL))
            fid = self.fh_fid[fh] = self._fid(real, os.fstat(fh))
            if flags & os.O_TRUNC:
                self._pend(fid, ("t", 0))
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mu:
            self._enter()
            return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mu:
            self._enter()
            fid = self.fh_fid[fh]
            name = os.path.basename(path) if path else os.path.basename(self.names.get(fid, ""))
            n = os.pwrite(fh, data, offset)
            self._pend(fid, ("w", offset, bytes(data[:n])))
            self._count(fid, "writes")
            if self.trap is not None and self.trap[0] == name:
                self.trap[1] -= 1
                if self.trap[1] <= 0:
                    nth, self.trap = self.trap[2], None
                    self._freeze(f"write #{nth} to {name}")
                    raise fuse.FuseOSError(errno.EIO)
            return n

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mu:
            self._enter()
            if fh is not None and fh in self.fh_fid:
                os.ftruncate(fh, length)
                fid = self.fh_fid[fh]
            else:
                real = self._real(path)
                os.truncate(real, length)
                fid = self._fid(real)
            self._pend(fid, ("t", length))
        return 0

    def flush(self, path: str, fh: int) -> int:
        with self._mu:
            self._enter()
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._mu:
            self.fh_fid.pop(fh, None)
            os.close(fh)  # even when frozen: the fd is ours
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mu:
            self._enter()
            fid = self.fh_fid.get(fh) if fh in self.fh_fid else self._fid(self._real(path))
            self._apply(fid, self.pending.pop(fid, []))
            self._count(fid, "fsyncs")
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mu:
            self._enter()
            real = self._real(path).rstrip("/") or self.root
            dfid = self._fid(real)
            listing = {}
            for name in os.listdir(real):
                listing[name] = self._fid(os.path.join(real, name))
            self.d_dirs[dfid] = listing
            self.dirty_dirs.discard(dfid)
            self._count(dfid, "dir_fsyncs")
        return 0


def _serve(fs: LazyFS, sock_path: str) -> None:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = fs.control(json.loads(line))
                except Exception as e:  # a bad request must not take the filesystem down
                    reply = {"error": f"{type(e).__name__}: {e}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main(argv: list[str]) -> int:
    backing, mountpoint, sock_path = argv[:3]
    seed = int(argv[3]) if len(argv) > 3 else 0
    fs = LazyFS(backing, seed)
    threading.Thread(target=_serve, args=(fs, sock_path), daemon=True).start()
    # Foreground; kernel-side locking (flock, fcntl) is kept local by not implementing lock/flock here.
    fuse.FUSE(fs, mountpoint, foreground=True, fsname="lazyfs", subtype="lazyfs")
    with fs._mu:
        if fs.frozen:
            written = fs.rebuild()
            print(json.dumps({"rebuilt": written, **(fs.report or {})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
