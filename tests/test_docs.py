"""The integration recipes in docs/ stay true: the Node-RED flow imports (well-formed, every wire lands on a
node), Telegraf's json_v2 paths exist in a real result, and the Ignition route is a valid route."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent import config
from edge_agent.decode import decode
from edge_agent.results import result_payload

DOCS = Path(__file__).resolve().parent.parent / "docs"
NODE = shutil.which("node")


def flow() -> list[dict[str, Any]]:
    return json.loads((DOCS / "node-red-flow.json").read_text(encoding="utf-8"))


def test_node_red_flow_is_an_importable_array_with_wired_ids() -> None:
    nodes = flow()
    assert isinstance(nodes, list) and all(isinstance(n, dict) for n in nodes)
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    by_id = {n["id"]: n for n in nodes}
    tabs = {n["id"] for n in nodes if n["type"] == "tab"}
    assert len(tabs) == 1
    for n in nodes:
        assert isinstance(n["type"], str) and n["type"]
        if n["type"] in ("tab", "mqtt-broker"):
            continue  # config nodes: no tab, no wires
        assert n["z"] in tabs, f"{n['id']} is on no tab"
        assert isinstance(n["x"], int) and isinstance(n["y"], int)
        assert isinstance(n["wires"], list) and all(isinstance(port, list) for port in n["wires"])
        for port in n["wires"]:
            for target in port:
                assert target in by_id, f"{n['id']} wires to missing node {target}"
                assert by_id[target]["type"] not in ("tab", "mqtt-broker", "inject", "mqtt in")
        if n["type"] == "function":
            assert len(n["wires"]) == n["outputs"]
        if n["type"].startswith("mqtt "):
            assert by_id[n["broker"]]["type"] == "mqtt-broker"
            assert n["qos"] == "1"


def test_node_red_flow_publishes_notes_and_shows_results_and_review() -> None:
    nodes = flow()
    outs = {n["topic"] for n in nodes if n["type"] == "mqtt out"}
    ins = {n["topic"]: n for n in nodes if n["type"] == "mqtt in"}
    assert outs == {"plant/line1/notes", "edge/feedback/gw-local", "edge/digest/gw-local/request"}
    assert {"edge/results/#", "edge/review/#", "edge/deadletter"} <= set(ins)
    by_id = {n["id"]: n for n in nodes}
    for topic in ("edge/results/#", "edge/review/#", "edge/deadletter", "edge/digest/+"):
        assert ins[topic]["datatype"] == "json"
        # Every subscription ends, possibly through a function, in a debug node.
        frontier = [t for port in ins[topic]["wires"] for t in port]
        seen = set()
        while frontier:
            node = by_id[frontier.pop()]
            seen.add(node["type"])
            frontier += [t for port in node.get("wires", []) for t in port]
        assert "debug" in seen, topic
    inject = next(n for n in nodes if n["type"] == "inject")
    maker = by_id[inject["wires"][0][0]]
    assert maker["type"] == "function" and by_id[maker["wires"][0][0]]["topic"] == "plant/line1/notes"


def _run_function(node: dict[str, Any], msg: dict[str, Any], tmp_path: Path,
                  flow_context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a function node's body in node.js with Node-RED's msg/node/context, as the runtime calls it."""
    src = tmp_path / f"{node['id']}.js"
    src.write_text(
        "const store = {}; const context = {get: (k) => store[k], set: (k, v) => { store[k] = v; }};\n"
        f"const flow = {{get: (k) => ({json.dumps(flow_context or {})})[k], set: () => {{}}}};\n"
        "const node = {status: () => {}, warn: console.error, error: console.error};\n"
        f"function f(msg) {{\n{node['func']}\n}}\n"
        f"process.stdout.write(JSON.stringify(f({json.dumps(msg)})));\n"
    )
    r = subprocess.run([NODE, str(src)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{node['name']}: {r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.skipif(NODE is None, reason="node (node.js) not installed")
def test_node_red_functions_make_a_routable_note_and_summarise_a_real_result(tmp_path: Path) -> None:
    by_name = {n["name"]: n for n in flow() if n["type"] == "function"}
    note = _run_function(by_name["make note"], {"payload": 0}, tmp_path)["payload"]
    text, input_id = decode(json.dumps(note).encode(), text_field="text", id_field="id", max_bytes=4096, max_depth=8)
    assert text and input_id and input_id.startswith("nodered-")
    sample = _telegraf_sample()
    out = _run_function(by_name["summarise"], {"topic": "edge/review/plant/line1/notes", "payload": sample}, tmp_path)
    cat = sample["results"]["category"]
    assert out["payload"]["category"] == f"{cat['label']} {round(100 * cat['score'])}%"
    assert out["payload"]["input_id"] == sample["input_id"] and out["payload"]["review"] is True
    assert out["payload"]["codes"] == [c["text"] for c in sample["results"]["patterns"]["codes"]]


@pytest.mark.skipif(NODE is None, reason="node (node.js) not installed")
def test_node_red_correction_and_digest_nodes_speak_the_contracts(tmp_path: Path) -> None:
    """The correction the button sends is one edge-agent accepts; the digest request parses; the view reads a
    real digest."""
    from edge_agent.config import DigestConfig
    from edge_agent.digest import Digester
    from edge_agent.feedback import parse
    from edge_agent.results import instant

    by_name = {n["name"]: n for n in flow() if n["type"] == "function"}
    sample = _telegraf_sample()
    fix = _run_function(by_name["make correction"], {"payload": 0}, tmp_path, {"last_result_id": sample["id"]})
    tasks = {"category": type("T", (), {"labels": ["leak", "vibration"]})()}
    c = parse(json.dumps(fix["payload"]).encode(), tasks, lambda _: False, {sample["id"]: json.dumps(sample)}.get)
    assert (c.result_id, c.label, c.text) == (sample["id"], "leak", sample["text"])
    req = _run_function(by_name["digest request"], {"payload": 0}, tmp_path)["payload"]
    assert instant(req["to"]) - instant(req["from"]) == 8 * 3600 and req["request_id"].startswith("nodered-")
    digest = Digester(DigestConfig(enabled=True), "gw-local").build([json.dumps(sample).encode()], 0, 4e9)
    view = _run_function(by_name["digest view"], {"payload": digest}, tmp_path)["payload"]
    assert view["notes"] == 1 and len(view["items"]) == 1 and sample["input_id"] in view["items"][0]


def _telegraf_sample() -> dict[str, Any]:
    text = (DOCS / "telegraf.md").read_text(encoding="utf-8")
    return json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))


def _gjson(obj: Any, path: str) -> Any:
    """The subset of GJSON paths the config uses: dotted keys, array indexes, '#' for a length."""
    for part in path.split("."):
        if part == "#":
            obj = len(obj)
        elif isinstance(obj, list):
            obj = obj[int(part)]
        else:
            obj = obj[part]
    return obj


def test_telegraf_sample_is_a_current_result_payload() -> None:
    sample = _telegraf_sample()
    fresh = json.loads(
        result_payload(
            rid="x", input_id=None, topic="t", received_at=0, text="", results={}, processed_at=0, gateway="g"
        )
    )
    assert list(sample) == list(fresh)
    assert sample["schema"] == fresh["schema"]
    assert {"patterns", "category", "urgency"} <= set(sample["results"])


def test_telegraf_conf_reads_results_with_json_v2() -> None:
    conf = tomllib.loads((DOCS / "telegraf.conf").read_text(encoding="utf-8"))
    (mqtt,) = conf["inputs"]["mqtt_consumer"]
    assert mqtt["data_format"] == "json_v2" and mqtt["qos"] == 1 and mqtt["persistent_session"] is True
    assert "edge/results/#" in mqtt["topics"]
    assert conf["outputs"]["influxdb_v2"][0]["bucket"]
    (parser,) = mqtt["json_v2"]
    sample = _telegraf_sample()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", _gjson(sample, parser["timestamp_path"]))
    kinds = {"float": float, "int": int, "bool": bool, "string": str}
    entries = parser["tag"] + parser["field"]
    assert len(entries) >= 8
    for entry in entries:
        value = _gjson(sample, entry["path"])  # KeyError/IndexError: the path names nothing
        if "type" in entry:
            assert isinstance(value, kinds[entry["type"]]), entry


def test_ignition_sparkplug_route_parses() -> None:
    text = (DOCS / "ignition.md").read_text(encoding="utf-8")
    route = re.search(r"```toml\n(.*?)\n```", text, re.S).group(1)
    tasks = '[tasks.category]\nkind = "patterns"\n[tasks.urgency]\nkind = "patterns"\n'
    cfg = config.parse(tomllib.loads(tasks + route), environ={})
    assert cfg.routes[0].format == "sparkplug" and cfg.routes[0].text_metric == ("Operator Note",)
