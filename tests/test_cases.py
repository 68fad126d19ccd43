"""Golden end-to-end cases: each folder of tests/cases/ runs through the agent between two real Mosquittos.

    tests/cases/<name>/config.toml     the case's part of the agent's config: its routes and tasks, and any
                                       key it changes (merged over tests/kit's agent_config, which gives the
                                       ports, the outbox and quick reconnects)
    tests/cases/<name>/input.jsonl     one inbound message a line, in publishing order:
                                       {"topic", "json": value | "text": str | "b64": str}
    tests/cases/<name>/expected.jsonl  one outbound message a line: {"topic", "retained", "payload"};
                                       retained false: delivered to the subscriber that was there all along, in
                                       this order per topic; retained true: what a late subscriber finds

Compared: every field of every payload except the times (VOLATILE), so a result id, a reason or a span that
changes fails its case. EDGE_AGENT_WRITE_CASES=1 writes expected.jsonl from the run instead; review its diff.
"""

from __future__ import annotations

import base64
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from .kit import wait_for
from .kit.clients import Collector
from .kit.config import agent_config, merge, write_toml

CASES = Path(__file__).resolve().parent / "cases"
VOLATILE = (("source", "received_at"), ("processed_at",))  # wall-clock times: different at every run
STATUS = "edge/status/"  # the agent's birth/will, not a case's output


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _payload(msg: dict[str, Any]) -> bytes:
    if "json" in msg:
        return json.dumps(msg["json"]).encode()
    if "text" in msg:
        return msg["text"].encode()
    return base64.b64decode(msg["b64"])


def _stable(raw: bytes) -> Any:
    payload = json.loads(raw)
    for path in VOLATILE:
        node = payload
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return payload


def _outputs(messages: list[tuple[str, bytes, bool]], retained: bool) -> list[dict[str, Any]]:
    return [{"topic": t, "retained": retained, "payload": _stable(p)}
            for t, p, _ in messages if not t.startswith(STATUS)]


def _by_topic(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in rows:
        out.setdefault(r["topic"], []).append(r["payload"])
    return out


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_case(case: str, tmp_path: Path, broker, uplink, collect, publisher, run_agent) -> None:
    folder = CASES / case
    cfg = merge(agent_config(source_port=broker.port, sink_port=uplink.port, outbox=tmp_path / "o.db"),
                tomllib.loads((folder / "config.toml").read_text(encoding="utf-8")))
    inputs = _jsonl(folder / "input.jsonl")
    writing = os.environ.get("EDGE_AGENT_WRITE_CASES") == "1"
    expected = [] if writing else _jsonl(folder / "expected.jsonl")
    live_expected = [e for e in expected if not e["retained"]]

    out = collect(uplink.port, "#")
    running = run_agent(write_toml(tmp_path / "c.toml", cfg))
    assert wait_for(running.agent.source.subscribed.is_set, 15)
    pub = publisher(broker.port)
    for msg in inputs:
        pub.publish(msg["topic"], _payload(msg))
    if writing:
        wait_for(lambda: False, 3)
    else:
        assert wait_for(lambda: len(_outputs(out.messages, False)) >= len(live_expected), 30), out.messages
        wait_for(lambda: False, 0.5)  # anything more than expected would arrive now
    live = _outputs(out.messages, False)

    late = Collector(uplink.port, "#", client_id=f"late-{case}")  # a subscriber that comes after the fact
    try:
        assert late.subscribed.wait(10)
        wait_for(lambda: False, 0.5)  # retained messages are sent right after the SUBACK
        kept = sorted(_outputs([m for m in late.messages if m[2]], True), key=lambda r: r["topic"])
    finally:
        late.close()

    if writing:
        rows = live + kept
        (folder / "expected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
        return
    assert _by_topic(live) == _by_topic(live_expected)
    assert kept == [e for e in expected if e["retained"]]
