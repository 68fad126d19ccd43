"""A real Mosquitto on 127.0.0.1 and a free port to put it on."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from . import wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# What a test broker does by default: persist (a restart keeps sessions and queued messages), queue up to
# 100k messages per client, and log enough that a test can read subscriptions from its log.
DURABLE = (
    "persistence true",
    "autosave_interval 1",
    "max_queued_messages 100000",
    *(f"log_type {t}" for t in ("error", "warning", "notice", "information", "subscribe")),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepting(port: int) -> bool:
    """Something listens on 127.0.0.1:port (a broker, the metrics endpoint)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A real Mosquitto on 127.0.0.1 with its config, log and persistence in its own directory. `settings`
    are the mosquitto.conf lines besides the listener, the log file and the directory (default DURABLE;
    bench/ passes its own, tuned so that the broker is not the bottleneck)."""

    def __init__(self, workdir: Path, port: int | None = None, settings: Sequence[str] = DURABLE) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        conf = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.dir}/mosquitto.log",
            *settings,
        ]
        if os.geteuid() == 0:
            conf.append("user root")  # else it drops privileges and cannot write the temp dir
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not wait_for(lambda: accepting(self.port), timeout=10):
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log()[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
