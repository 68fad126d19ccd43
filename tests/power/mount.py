"""Driving tests/power/lazyfs.py from a test: mount, cut power, unmount (the "reboot"), read the disk back.

The filesystem runs as its own process (python -m tests.power.lazyfs), one per mount: a cut freezes it,
the unmount makes it rewrite its backing directory to what was durable and exit, and the next mount is a
fresh process over that directory, as a rebooted machine would mount its disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..kit import REPO, wait_for

FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount")


def require_fuse() -> None:
    """Skip (with the reason) where FUSE truly cannot run; under CI a missing install step is a failure."""
    reasons = []
    if not os.path.exists("/dev/fuse"):
        reasons.append("no /dev/fuse on this machine")
    if FUSERMOUNT is None:
        reasons.append("no fusermount3 (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401  (loads libfuse3 through ctypes: fails here when it is missing)
    except (ImportError, OSError) as e:
        reasons.append(f"the FUSE binding does not load ({type(e).__name__}: {e}); "
                       "pip install the test extra and apt-get install fuse3")
    if not reasons:
        return
    if os.environ.get("CI") and os.path.exists("/dev/fuse"):
        pytest.fail("power-cut test cannot run in CI: " + "; ".join(reasons) + " (.ci/setup installs these)")
    pytest.skip("power-cut test needs FUSE: " + "; ".join(reasons))


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class LazyMount:
    def __init__(self, backing: Path, mountpoint: Path, ctl: Path, seed: int = 0) -> None:
        self.backing, self.mountpoint, self.ctl, self.seed = backing, mountpoint, ctl, seed
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounts = 0
        self.last_exit: dict[str, Any] = {}

    def mount(self) -> LazyMount:
        assert self.proc is None and not is_mounted(self.mountpoint)
        self.mounts += 1
        self.ctl.unlink(missing_ok=True)  # the last mount's: wait for this one's own
        self._log = (self.backing.parent / f"lazyfs-{self.mounts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.power.lazyfs", str(self.backing), str(self.mountpoint), str(self.ctl),
             str(self.seed + self.mounts)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )
        proc = self.proc
        if not wait_for(lambda: (is_mounted(self.mountpoint) and self.ctl.exists()) or proc.poll() is not None, 15):
            raise RuntimeError("lazyfs did not mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"lazyfs exited {self.proc.returncode}: {self._logtext()}")
        return self

    def _logtext(self) -> str:
        return (self.backing.parent / f"lazyfs-{self.mounts}.log").read_text(errors="replace")[-3000:]

    def request(self, msg: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.ctl))
            with s.makefile("rwb") as f:
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                return json.loads(f.readline())

    def cut(self) -> dict[str, Any]:
        """Power off, now: nothing written from here on becomes durable."""
        return self.request({"op": "cut"})

    def arm(self, name: str, nth: int) -> None:
        self.request({"op": "arm", "name": name, "nth": nth})

    def wait(self, timeout: float) -> dict[str, Any]:
        return self.request({"op": "wait", "timeout": timeout}, timeout=timeout + 10)

    def torn(self, p: float) -> None:
        self.request({"op": "torn", "p": p})

    def unmount(self) -> dict[str, Any]:
        """Unmount; after a cut the filesystem process rewrites the backing dir to the durable image."""
        if self.proc is None:
            return {}
        assert FUSERMOUNT is not None
        done = subprocess.run([FUSERMOUNT, "-u", str(self.mountpoint)], check=False, timeout=30,
                              capture_output=True)
        if done.returncode != 0:  # busy: something still has a file open there; detach it anyway
            subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mountpoint)], check=False, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if is_mounted(self.mountpoint):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mountpoint)], check=False, timeout=30)
        rc, self.proc = self.proc.returncode, None
        self._log.close()
        lines = [ln for ln in self._logtext().splitlines() if ln.startswith('{"rebuilt"')]
        self.last_exit = json.loads(lines[-1]) if lines else {}
        if rc != 0 or done.returncode != 0:
            raise RuntimeError(f"lazyfs unmount: fusermount {done.returncode} {done.stderr.decode()[-500:]}, "
                               f"lazyfs exited {rc}: {self._logtext()}")
        return self.last_exit

    def close(self) -> None:
        """Teardown, whatever happened: never leave a mount behind."""
        with contextlib.suppress(Exception):
            self.unmount()
        if is_mounted(self.mountpoint):
            subprocess.run([FUSERMOUNT or "fusermount3", "-u", "-z", str(self.mountpoint)], check=False, timeout=30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def read_outbox(db: Path, scratch: Path) -> dict[str, Any]:
    """Open a copy of the outbox as the disk holds it (SQLite recovers the WAL in the copy) and return
    {"ok": quick_check passed, "ids": result ids, "error": ...}. A copy, so the daemon's own recovery
    is left to the daemon."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    if not db.exists():
        return {"exists": False, "ok": True, "ids": set()}
    for suffix in ("", "-wal"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            shutil.copyfile(src, scratch / f"outbox.db{suffix}")
    try:
        with contextlib.closing(sqlite3.connect(scratch / "outbox.db", timeout=5)) as conn:
            check = [r[0] for r in conn.execute("PRAGMA quick_check")]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            ids = {r[0] for r in conn.execute("SELECT id FROM outbox")} if "outbox" in tables else set()
        return {"exists": True, "ok": check == ["ok"], "check": check, "ids": ids}
    except sqlite3.Error as e:
        return {"exists": True, "ok": False, "error": f"{type(e).__name__}: {e}", "ids": set()}


def settle(timeout: float = 1.0) -> None:
    time.sleep(timeout)
