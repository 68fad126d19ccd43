"""The daemon's footprint with the shipped profiles: start to READY, peak RSS, notes/s end to end.

    python bench/run.py footprint [--quick] --json OUT

For each profile, configs/local.toml (the quickstart: MiniLM classifiers, Qwen2.5-Coder-0.5B extraction,
feedback and the digest on) and configs/low-memory.toml: the file as shipped, with only the broker ports
(a Mosquitto of the test kit on a free loopback port), the outbox path (a temp dir) and the log level
(warning, JSON, stderr to a file) changed. The real daemon (`python -m edge_agent run`) in a child process,
run from the repository root as the quickstart does, with NOTIFY_SOCKET set to a datagram socket of ours:
- `ready_s`: from the process start to its READY=1 (sd_notify: the outbox is open, every model is loaded,
  the source is subscribed), the figure systemd's TimeoutStartSec is measured against;
- then N notes (bench.common.make_notes) published QoS 1 on plant/l1/notes at once: `notes_per_s` = N /
  (last result received on edge/results/ or edge/review/ - first publish);
- `peak_rss_mb`: the child's VmHWM (/proc/PID/status) after the last result: its peak resident memory.
Targets (issue 11): READY <= 10 s and peak RSS <= 1.5 GB with the quickstart profile (a 2 GB gateway),
<= 300 MB with low-memory. There is no peer to divide by: each row carries its `target` and `meets`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from tests.kit import REPO, wait_for
from tests.kit.broker import Broker
from tests.kit.clients import Collector, Publisher
from tests.kit.config import merge, write_toml

MODELS = ("minilm-l6", "qwen2.5-coder-0.5b-instruct")  # the profiles' models (bench/run.py builds them)
PROFILES = {"quickstart": ("configs/local.toml", 1500), "low-memory": ("configs/low-memory.toml", 300)}
READY_TARGET_S = 10.0


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def _profile(name: str, shipped: str, n: int, work: Path, broker: Broker) -> dict[str, Any]:
    from bench.common import make_notes

    cfg = tomllib.loads((REPO / shipped).read_text(encoding="utf-8"))
    cfg = merge(cfg, {"source": {"port": broker.port}, "sink": {"port": broker.port},
                      "outbox": {"path": str(work / f"{name}.db")},
                      "log": {"level": "warning", "format": "json"}})
    path = write_toml(work / f"{name}.toml", cfg)
    notify = work / f"{name}.notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    results = Collector(broker.port, "edge/#")  # results, and low-confidence ones on edge/review/

    def published() -> int:
        return sum(t.startswith(("edge/results/", "edge/review/")) for t, _, retained in list(results.messages)
                   if not retained)

    assert results.subscribed.wait(10), "the results consumer did not subscribe"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(path)], cwd=REPO,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                            stdout=subprocess.DEVNULL, stderr=(work / f"{name}.stderr").open("wb"))
    try:
        ready = None
        while ready is None and time.perf_counter() - t0 < 120:
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                if proc.poll() is not None:
                    raise SystemExit(f"footprint: the {name} daemon exited ({proc.returncode}): "
                                     f"{(work / f'{name}.stderr').read_text()[-2000:]}") from None
                continue
            if "READY=1" in message.split("\n"):
                ready = time.perf_counter() - t0
        if ready is None:
            raise SystemExit(f"footprint: no READY=1 from the {name} daemon within 120 s")
        pub = Publisher(broker.port)
        texts = [json.loads(payload)["text"] for _, payload in make_notes(n, seed=11)]
        p0 = time.perf_counter()
        for i, text in enumerate(texts):
            pub.publish("plant/l1/notes", json.dumps({"id": f"n{i}", "text": text}), wait=False)
        if not wait_for(lambda: published() >= n, timeout=300, interval=0.05):
            raise SystemExit(f"footprint: {published()} of {n} results from the {name} daemon")
        wall = time.perf_counter() - p0
        rss = _peak_rss_mb(proc.pid)
        pub.close()
    finally:
        proc.terminate()
        proc.wait(60)
        results.close()
        sock.close()
    return {"ready_s": round(ready, 2), "notes_per_s": round(n / wall, 2), "peak_rss_mb": rss,
            "tasks": sorted(cfg.get("tasks", {})), "config": shipped}


def run(quick: bool = False) -> list[dict[str, Any]]:
    n = 24 if quick else 48
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        work = Path(tmp)
        with Broker(work / "broker") as broker:
            for name, (shipped, rss_target) in PROFILES.items():
                got = _profile(name, shipped, n, work, broker)
                common = {"profile": name, "config": shipped, "tasks": got["tasks"], "notes": n, "peer": None,
                          "ratio": None}
                rows += [
                    {"name": f"footprint_ready_s/{name}", "unit": "s", "ours": got["ready_s"], **common,
                     "target": READY_TARGET_S, "meets": got["ready_s"] <= READY_TARGET_S},
                    {"name": f"footprint_peak_rss_mb/{name}", "unit": "MB", "ours": got["peak_rss_mb"], **common,
                     "target": rss_target, "meets": got["peak_rss_mb"] <= rss_target},
                    {"name": f"footprint_notes_per_s/{name}", "unit": "notes/s", "ours": got["notes_per_s"],
                     **common},
                ]
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
