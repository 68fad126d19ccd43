"""The test kit: the real parts that tests and benches start, one of each, with no pytest in it.

- `broker.py`: `Broker` (a real Mosquitto on a free loopback port), `free_port`, `accepting`
- `clients.py`: `Collector` (a plant consumer that records), `Publisher` (a plant producer)
- `agent.py`: `Running` (the Agent on a thread, in-process), `AgentProcess` (the daemon as a subprocess),
  `log_events` (the records of one event in the daemon's JSON log)
- `config.py`: the agent's config as a dict written to TOML (`agent_config`, `write_config`)
- `proxy.py`: `FaultProxy`, a TCP proxy that breaks the link on command
- here: `REPO`, `wait_for`

tests/conftest.py wraps them in fixtures that clean up after a test; bench/ imports them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll until predicate() is true or timeout seconds passed; the last answer is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
