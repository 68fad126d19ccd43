"""Log templates with drain3 on real log lines (Loghub samples in ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.config import LogTemplateTaskConfig
from edge_agent.message import Note
from edge_agent.tasks.logtemplate import LogTemplateTask, parameters

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rows(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (the development data sits beside the checkout)")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parameters_are_spans() -> None:
    text = "Connection closed by  10.0.0.1 port 22"
    ps = parameters("Connection closed by <*> port <*>", text)
    assert [p["text"] for p in ps] == ["10.0.0.1", "22"]
    assert all(text[p["start"] : p["end"]] == p["text"] for p in ps)
    assert parameters("a <*>", "a b c") == []


def test_openssh_templates_grounded_and_stable(tmp_path: Path) -> None:
    # The message part of each syslog line (what a log shipper publishes as the message field).
    lines = [r["content"] for r in rows("openssh_2k.jsonl")]
    task = LogTemplateTask("logs", LogTemplateTaskConfig(kind="log_template"))
    notes = [Note(text=f" {t}", topic="t") for t in lines]
    out = task.process(notes)
    assert len(out) == len(lines)
    for note, r in zip(notes, out, strict=True):
        for p in r["parameters"]:
            assert note.text[p["start"] : p["end"]] == p["text"]
    templates = {r["template"] for r in out}
    # 2,000 lines collapse into a small number of templates, with variable parts found.
    assert 5 <= len(templates) <= 200, len(templates)
    assert sum(1 for r in out if r["parameters"]) > len(out) // 2
    # Once learned, the same line maps to the same template id.
    again = task.process(notes[-50:])
    assert [r["template_id"] for r in again] == [r["template_id"] for r in task.process(notes[-50:])]


def test_hdfs_block_ids_are_parameters() -> None:
    data = rows("hdfs_2k.jsonl")[:400]
    task = LogTemplateTask("logs", LogTemplateTaskConfig(kind="log_template"))
    out = task.process([Note(text=r["text"], topic="t") for r in data])
    params = [p["text"] for r in out[200:] for p in r["parameters"]]
    assert sum("blk_" in p for p in params) >= 100


def test_state_file_persists_templates(tmp_path: Path) -> None:
    cfg = LogTemplateTaskConfig(kind="log_template", state_file=tmp_path / "drain3.json")
    lines = [f"pump {i} tripped on overcurrent at {i * 3} A" for i in range(20)]
    task = LogTemplateTask("logs", cfg)
    first = task.process([Note(text=t, topic="t") for t in lines])[-1]
    task.close()
    assert (tmp_path / "drain3.json").exists()
    again = LogTemplateTask("logs", cfg).process([Note(text="pump 99 tripped on overcurrent at 7 A", topic="t")])[0]
    assert again["template"] == first["template"] == "pump <*> tripped on overcurrent at <*> A"
