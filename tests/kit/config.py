"""The agent's config as a dict, written to TOML with tomli-w: a test names the keys it changes, merged
over a base, instead of editing a template's text.

    write_config(path, source_port=b.port, sink_port=u.port, outbox=tmp / "o.db",
                 pipeline={"max_payload_bytes": 1000}, sink={"protocol": "3.1.1"})
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

# The route most tests run: JSON notes on plant/<line>/notes through the patterns task.
ROUTE: dict[str, Any] = {
    "topic": "plant/+/notes",
    "text_field": "text",
    "id_field": "id",
    "output_topic": "edge/results/{topic}",
    "tasks": ["patterns"],
}


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of base with over merged in: a table into a table key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def agent_config(
    *, source_port: int, sink_port: int, outbox: Path, routes: list[dict[str, Any]] | None = None, **tables: Any
) -> dict[str, Any]:
    """The test agent: gateway gw-test, keepalive 5 s and reconnect delays 0.1-0.5 s on both sides, replay
    at 2000/s, warning-level JSON logs, `routes` (default: [ROUTE]); `tables` merge over that."""
    base: dict[str, Any] = {
        "gateway_id": "gw-test",
        "dead_letter_topic": "edge/deadletter",
        "source": {"port": source_port, "keepalive": 5, "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5},
        "sink": {
            "port": sink_port,
            "keepalive": 5,
            "reconnect_min_delay": 0.1,
            "reconnect_max_delay": 0.5,
            "replay_rate": 2000,
        },
        "outbox": {"path": str(outbox)},
        "log": {"level": "warning", "format": "json"},
        "routes": copy.deepcopy([ROUTE] if routes is None else routes),
    }
    return merge(base, tables)


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def write_toml(path: Path, cfg: Mapping[str, Any]) -> Path:
    """cfg as TOML at path (a Path value is written as its string)."""
    path.write_text(tomli_w.dumps(_plain(cfg)))
    return path


def write_config(
    path: Path, *, source_port: int, sink_port: int, outbox: Path, routes: list[dict[str, Any]] | None = None,
    **tables: Any,
) -> Path:
    """agent_config(...) written to path."""
    return write_toml(path, agent_config(source_port=source_port, sink_port=sink_port, outbox=outbox,
                                         routes=routes, **tables))
