"""The agent under test: in-process on a thread (`Running`), or as the real daemon in a subprocess
(`AgentProcess`, for crash tests), and `log_events` to read what the daemon logged."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edge_agent import config
from edge_agent.agent import Agent

from . import REPO, wait_for


class Running:
    """Agent.run on a thread, stopped through its injected stop event, for a config file (loaded without the
    environment) or a parsed config. By default the constructor returns once the source is connected (15 s
    at most); with wait=False at once (the caller waits for what it measures)."""

    def __init__(self, cfg: Path | config.Config, *, wait: bool = True, name: str | None = None) -> None:
        self.agent = Agent(cfg if isinstance(cfg, config.Config) else config.load(cfg, environ={}))
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        if wait:
            assert wait_for(lambda: self.agent.source is not None and self.agent.source.connected.is_set(), 15)

    def _run(self) -> None:
        try:
            self.agent.run(self.stop_event)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error


class AgentProcess:
    """The daemon as a real subprocess (`python -m edge_agent run`), stdout and stderr to a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.logpath = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self._logf = self.logpath.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Send sig and wait for the exit; the exit status (-sig where it killed the process)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._logf.close()
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def log_events(path: Path, event: str) -> list[dict]:
    """The records of one event in a JSON log file written by the daemon (other lines skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out
