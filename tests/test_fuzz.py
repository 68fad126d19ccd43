"""Fuzzing the paths bad input takes: payload → pipeline → outbox, inbound topics, and the config.

Hypothesis, derandomized (a fixed seed per test, so CI sees the same cases every run); 10,000 cases in all
(plus test_decode's 1,500). The property everywhere: no crash, and every input accounted for — a result
whose text is what decode() returned, or a dead-letter record with a reason and the original bytes; a bad
config is a ConfigError naming a field and a fix, never anything else. An end-to-end test sends 300 nasty
payloads through a real Mosquitto and checks each one came out as a result or a dead letter; atheris
(when installed) fuzzes decode() guided by coverage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import config
from edge_agent.decode import decode
from edge_agent.errors import ConfigError, DecodeError
from edge_agent.message import Inbound
from edge_agent.outbox.store import Outbox
from edge_agent.pipeline import MAX_TOPIC_BYTES, Pipeline
from edge_agent.tasks.registry import build_tasks

from .kit import REPO, wait_for
from .kit.config import write_config

FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# -- payloads -------------------------------------------------------------------------------------------
_any_char = st.characters(codec=None, exclude_categories=())  # control characters and lone surrogates too
nasty_text = st.one_of(
    st.text(_any_char, max_size=60),
    st.sampled_from(["{0.__class__}", "%s%n%x", "__import__('os').system('id')", "${jndi:x}", "\x00\x1b[2J", "\u202e"]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), nasty_text
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(nasty_text, kids, max_size=3),
    max_leaves=6,
)


def _json(obj: object) -> bytes:
    # allow_nan: NaN and Infinity as bare tokens, which JSON forbids; surrogatepass: invalid UTF-8.
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _nested(depth: int) -> bytes:
    return b'{"text": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"


payloads = st.one_of(
    st.binary(max_size=300),  # mostly invalid UTF-8
    nasty_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"text": json_values}, optional={"id": json_values, "x": json_values}).map(_json),
    json_values.map(_json),  # arrays, scalars, objects without "text"
    st.integers(min_value=0, max_value=3000).map(_nested),
    st.tuples(st.sampled_from([b'{"text": "', b"{", b'{"text": "x", "id": ']), st.binary(max_size=50)).map(b"".join),
)


class Harness:
    """A real Pipeline (patterns task included) over a real outbox; returns what one batch stored."""

    def __init__(self, root: Path, routes: str, pipeline: str = "") -> None:
        p = root / "c.toml"
        p.write_text(f'[outbox]\npath = "{root / "o.db"}"\n[pipeline]\nmax_json_depth = 16\n{pipeline}\n{routes}')
        self.root = root
        self.cfg = config.load(p, environ={})
        self.outbox = Outbox(self.cfg.outbox).open()
        self.acked: list[int] = []
        self.pipeline = Pipeline(
            self.cfg, build_tasks(self.cfg), self.outbox, None, lambda item: self.acked.append(item.mid), lambda: None
        )

    def run(self, batch: list[Inbound]) -> dict[str, tuple[str, dict]]:
        """Process one batch; {inbound topic: (outbox topic, stored record)}, one per input."""
        self.acked.clear()
        self.pipeline.process(batch)
        assert sorted(self.acked) == sorted(i.mid for i in batch)  # every input acked after the commit
        rows = self.outbox.batch(10_000)
        self.outbox.accept([r.seq for r in rows])
        out = {}
        for r in rows:
            rec = json.loads(r.payload, parse_constant=pytest.fail)  # valid JSON, no NaN
            assert rec["source"]["topic"] not in out
            out[rec["source"]["topic"]] = (r.topic, rec)
        assert len(out) == len(batch)
        return out

    def close(self) -> None:
        self.outbox.close()


def _check(item: Inbound, outbox_topic: str, rec: dict, dead_letter_topic: str = "edge/deadletter", **kw) -> None:
    if rec["schema"] == "edge-agent/deadletter/1":
        assert outbox_topic == dead_letter_topic and rec["reason"]
        assert base64.b64decode(rec["payload_b64"]) == item.payload
        return
    assert rec["schema"] == "edge-agent/result/1"
    text, input_id = decode(item.payload, **kw)
    assert (rec["text"], rec["input_id"]) == (text, input_id)
    rec["text"].encode("utf-8")  # publishable
    assert "error" not in rec["results"]["patterns"]


def _fast_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """tmpfs when there is one: thousands of synchronous commits cost fsyncs, not what is tested here."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        return Path(tempfile.mkdtemp(prefix=f"edge-agent-{name}-", dir=shm))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    h = Harness(
        _fast_dir(tmp_path_factory, "fuzz"), '[[routes]]\ntopic = "fuzz/#"\nid_field = "id"\ntasks = ["patterns"]\n'
    )
    yield h
    h.close()
    shutil.rmtree(h.root, ignore_errors=True)


@settings(FUZZ, max_examples=2500)
@given(st.lists(payloads, min_size=1, max_size=8))
def test_fuzz_payloads_each_a_result_or_a_dead_letter(harness: Harness, batch_payloads: list[bytes]) -> None:
    batch = [Inbound(f"fuzz/{i}", p, i + 1, 1, time.time()) for i, p in enumerate(batch_payloads)]
    stored = harness.run(batch)
    for item in batch:
        _check(item, *stored[item.topic], id_field="id", max_bytes=256 * 1024, max_depth=16)


# -- topics ---------------------------------------------------------------------------------------------
# What a broker can deliver: 1 to 65535 bytes of UTF-8, no wildcards, no U+0000.
_topic_char = st.characters(exclude_characters="+#\x00", exclude_categories=("Cs",))
topics = st.one_of(
    st.text(_topic_char, min_size=1, max_size=60),
    st.integers(min_value=65_500, max_value=65_535).map(lambda n: "t" * n),
    st.integers(min_value=21_830, max_value=21_845).map(lambda n: "日" * n),  # 3 bytes each
    st.integers(min_value=0, max_value=65_535 - 13).map(lambda n: "x" * n),
)


@pytest.fixture(scope="module")
def topic_harness(tmp_path_factory: pytest.TempPathFactory):
    # A route on '#' reads everything: with results on another broker (sink port 1884), not its own output.
    routes = '[sink]\nport = 1884\n[[routes]]\ntopic = "#"\ntasks = ["patterns"]\n'
    h = Harness(_fast_dir(tmp_path_factory, "topics"), routes)
    yield h
    h.close()
    shutil.rmtree(h.root, ignore_errors=True)


@settings(FUZZ, max_examples=1500)
@given(st.lists(topics, min_size=1, max_size=4, unique=True), st.text(_topic_char, max_size=50))
def test_fuzz_topics_up_to_the_mqtt_limit(topic_harness: Harness, names: list[str], text: str) -> None:
    payload = ("note " + text).encode()
    batch = [Inbound(t, payload, i + 1, 1, time.time()) for i, t in enumerate(names)]
    stored = topic_harness.run(batch)
    for item in batch:
        outbox_topic, rec = stored[item.topic]
        expected = "edge/results/" + item.topic
        too_long = len(expected.encode()) > MAX_TOPIC_BYTES
        if item.topic.startswith("$"):  # '#' does not match $-topics (MQTT 4.7.2)
            assert "no route matches" in rec["reason"]
        elif too_long:
            assert rec["reason"].startswith("output topic too long")
        elif rec["schema"] == "edge-agent/result/1":
            assert outbox_topic == expected  # the topic is copied, never interpreted
        _check(item, outbox_topic, rec)


# -- config ---------------------------------------------------------------------------------------------
# A valid base, then up to three keys anywhere in it set to arbitrary TOML values (or removed).
SECTIONS = {
    (): config.Config,
    ("source",): config.SourceConfig,
    ("sink",): config.SinkConfig,
    ("sink", "tls"): config.TLSConfig,
    ("outbox",): config.OutboxConfig,
    ("pipeline",): config.PipelineConfig,
    ("log",): config.LogConfig,
    ("routes", 0): config.RouteConfig,
    ("tasks", "t"): config.ClassifierTaskConfig,
    ("tasks", "g"): config.GeneratorTaskConfig,
    ("tasks", "l"): config.LogTemplateTaskConfig,
}
KEYS = [(sec, key) for sec, model in SECTIONS.items() for key in [*model.model_fields, "kind", "bogus"]]
toml_scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text(_topic_char, max_size=12)
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3) | st.dictionaries(st.text(max_size=4), toml_scalars)


def _mutated(changes: list[tuple[tuple, object]]) -> dict:
    data: dict = {
        "routes": [{"topic": "a/+/b", "tasks": ["t"]}],
        "tasks": {"t": {"kind": "patterns"}, "g": {"kind": "log_template"}, "l": {"kind": "log_template"}},
    }
    for (section, key), value in changes:
        node = data
        for part in section:
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            elif isinstance(node, list) and node:
                node = node[0]
        if not isinstance(node, dict):  # an earlier change replaced this section by a scalar or a list
            continue
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return data


config_data = st.lists(st.tuples(st.sampled_from(KEYS), st.none() | toml_values), max_size=3).map(_mutated)
environ = st.dictionaries(
    st.sampled_from(["EDGE_AGENT__SINK__PORT", "EDGE_AGENT__SOURCE__TLS__CA_FILE", "EDGE_AGENT__X", "EDGE_AGENT__",
                     "EDGE_AGENT__ROUTES", "EDGE_AGENT__LOG__LEVEL__DEEP", "EDGE_AGENT__SINK"]),
    st.text(max_size=10),
    max_size=2,
)  # fmt: skip


@settings(FUZZ, max_examples=4500)
@given(config_data, environ)
def test_fuzz_config_valid_or_a_named_error_with_a_fix(data: dict, env: dict[str, str]) -> None:
    try:
        cfg = config.parse(data, env)
    except ConfigError as e:
        assert e.field and e.message and e.hint, e
    else:
        assert cfg.routes


@settings(FUZZ, max_examples=1500)
@given(st.text(max_size=200))
def test_fuzz_config_file_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz.toml"
    p.write_text('[[routes]]\ntopic = "a"\n' + text, encoding="utf-8", errors="surrogatepass")
    try:
        config.load(p, environ={})
    except ConfigError as e:
        assert e.field and e.message and e.hint, e


# -- big and deep ----------------------------------------------------------------------------------------
def test_ten_megabyte_payloads(tmp_path: Path) -> None:
    big_text = b"P-101 " * (10 * 1024 * 1024 // 6)
    big_json = b'{"text": "' + big_text + b'"}'
    deep = b'{"text": "x", "a": ' + b"[" * (5 * 1024 * 1024) + b"]" * (5 * 1024 * 1024) + b"}"
    h = Harness(tmp_path, '[[routes]]\ntopic = "big/#"\n[[routes]]\ntopic = "small/#"\nmax_payload_bytes = 16\n',
                pipeline="max_payload_bytes = 16777216\nmax_result_bytes = 67108864")  # fmt: skip
    try:
        batch = [
            Inbound("big/text", big_text, 1, 1, time.time()),
            Inbound("big/json", big_json, 2, 1, time.time()),
            Inbound("big/deep", deep, 3, 1, time.time()),
            Inbound("small/text", big_text, 4, 1, time.time()),
        ]
        stored = h.run(batch)
    finally:
        h.close()
    assert len(stored["big/text"][1]["text"]) == len(big_text)
    assert stored["big/json"][1]["text"] == big_text.decode()
    assert stored["big/deep"][1]["reason"] == "JSON nested deeper than 16 levels"
    assert stored["small/text"][1]["reason"] == f"payload too large: {len(big_text)} bytes, limit 16"
    with pytest.raises(DecodeError, match="too large"):
        decode(big_json)  # the default limit, 256 KiB


# -- end to end ------------------------------------------------------------------------------------------
def nasty_payloads(n: int, seed: int = 4) -> list[bytes]:
    """n payloads from a fixed seed: every kind of bad input, and some good ones, mixed."""
    rnd = random.Random(seed)

    def text() -> str:
        return "".join(rnd.choice(["P-101", " ", "é", "日", "\x00", "\x1b", "{", "}", "%s", "\u202e", "\\", '"'])
                       for _ in range(rnd.randint(0, 30)))  # fmt: skip

    makers = [
        lambda: rnd.randbytes(rnd.randint(0, 100)),
        lambda: text().encode(),
        lambda: json.dumps({"text": text(), "id": rnd.choice([1, "a", None, True, [1], 1.5])}).encode(),
        lambda: json.dumps({"text": rnd.choice([float("nan"), float("inf"), 1, None, [], {}])}).encode(),
        lambda: _nested(rnd.randint(10, 5000)),
        lambda: b'{"text": "' + rnd.randbytes(20) + b'"}',
        lambda: b"x" * rnd.choice([1000, 70_000]),
        lambda: json.dumps({"note": {"text": text()}}).encode(),
    ]
    return [rnd.choice(makers)() for _ in range(n)]


def test_300_nasty_payloads_through_a_real_broker(tmp_path, broker, collect, publisher, run_agent) -> None:
    cfg = write_config(
        tmp_path / "c.toml", source_port=broker.port, sink_port=broker.port, outbox=tmp_path / "o.db",
        routes=[{"topic": "fuzz/+/in", "id_field": "id", "tasks": ["patterns"]}],
        pipeline={"max_payload_bytes": 65536, "max_json_depth": 64},
    )  # fmt: skip
    out = collect(broker.port, "edge/results/#")
    dlq = collect(broker.port, "edge/deadletter")
    run_agent(cfg)
    pub = publisher(broker.port)
    # One topic per payload, so each outcome can be matched; some with non-ASCII levels.
    sent = {f"fuzz/{i}{'é日🔥' if i % 7 == 0 else ''}/in": p for i, p in enumerate(nasty_payloads(300))}
    for topic, payload in sent.items():
        pub.publish(topic, payload, wait=False)

    def outcomes() -> dict[str, dict]:
        return {m["source"]["topic"]: m for m in out.json() + dlq.json()}

    assert wait_for(lambda: len(outcomes()) >= len(sent), 90), len(outcomes())
    got = outcomes()
    assert set(got) == set(sent)
    kinds = {"result": 0, "deadletter": 0}
    for topic, payload in sent.items():
        rec = got[topic]
        if rec["schema"] == "edge-agent/deadletter/1":
            kinds["deadletter"] += 1
            assert rec["reason"] and rec["kind"]
            kept = base64.b64decode(rec["payload_b64"])
            if rec.get("truncated"):  # a payload over pipeline.dead_letter_payload_bytes: a prefix, its size, sha256
                assert rec["payload_bytes"] == len(payload)
                assert rec["payload_sha256"] == hashlib.sha256(payload).hexdigest()
                assert kept == payload[: len(kept)] and len(kept) == 8192
            else:
                assert kept == payload
        else:
            kinds["result"] += 1
            assert rec["text"] == decode(payload, id_field="id", max_bytes=65536, max_depth=64)[0]
    assert min(kinds.values()) > 50, kinds  # both outcomes well exercised


def test_atheris_coverage_guided_decode(tmp_path: Path) -> None:
    """100,000 libFuzzer runs of decode(), seeded: the same property, found by coverage instead of by shape."""
    pytest.importorskip("atheris")
    seeds = [b'{"text": "P-101 leak", "id": 7}', b'{"note": {"text": "x"}, "id": "a"}', b"plain", b'{"a": [[1]]}']
    for i, seed in enumerate(seeds):
        (tmp_path / f"seed{i}").write_bytes(seed)
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "atheris_decode.py"), "-runs=100000", "-seed=1", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0 and "Done 100000 runs" in r.stderr, r.stderr[-3000:]
