"""Config: a bad file fails at start naming the field and the fix; the CLI exits 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edge_agent import config
from edge_agent.errors import ConfigError
from edge_agent.mqtt import credentials

REPO = Path(__file__).resolve().parent.parent
ROUTE = '[[routes]]\ntopic = "plant/+/notes"\n'


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p, environ={} if environ is None else environ)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    cfg = config.load(path, environ={})
    assert cfg.routes


def test_defaults_and_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, ROUTE)
    assert cfg.source.protocol == "5" and cfg.sink.inflight == 64
    assert cfg.routes[0].tasks == () and cfg.dead_letter_topic == "edge/deadletter"
    with pytest.raises(Exception, match="frozen"):
        cfg.gateway_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ('gatway_id = "x"\n' + ROUTE, "gatway_id", "spelling"),
        ("[source]\nport = 70000\n" + ROUTE, "source.port", "lower"),
        ('[source]\nport = "abc"\n' + ROUTE, "source.port", "whole number"),
        ('[sink]\nprotocol = "4"\n' + ROUTE, "sink.protocol", "allowed values"),
        ("", "routes", "[[routes]]"),
        ('[[routes]]\ntopic = "plant/#/x"\n', "routes.0.topic", "a whole level and the last one"),
        ('[[routes]]\ntopic = "a"\ntasks = ["classify"]\n', "routes.0.tasks", "[tasks.classify]"),
        ('[[routes]]\ntopic = "a"\noutput_topic = "out/+"\n', "routes.0.output_topic", "must not contain '+' or '#'"),
        ('gateway_id = "gw 1"\n' + ROUTE, "gateway_id", "letters, digits"),
        ('dead_letter_topic = "dl/#"\n' + ROUTE, "dead_letter_topic", "must not contain '+' or '#'"),
        ('[sink]\nstatus_topic = "edge/+/status"\n' + ROUTE, "sink.status_topic", "must not contain '+' or '#'"),
        (
            '[tasks.p]\nkind = "patterns"\nasset_patterns = ["(unclosed"]\n' + ROUTE,
            "tasks.p.asset_patterns",
            "does not compile",
        ),
        ('[tasks.p]\nkind = "llm"\n' + ROUTE, "tasks.p", "kind"),
        ('[sink]\npassword_file = "/x"\n' + ROUTE, "sink", "set username too"),
        ('[sink.tls]\ncert_file = "/c.pem"\n' + ROUTE, "sink.tls", "set both"),
        ("[outbox]\nmax_bytes = 10\n" + ROUTE, "outbox.max_bytes", "raise"),
    ],
)
def test_invalid_field_named_with_fix(tmp_path: Path, text: str, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, text)
    assert ei.value.field == field, str(ei.value)
    assert hint, "an empty hint is in every string: the check could not fail"
    assert hint in ei.value.hint or hint in ei.value.message, str(ei.value)
    assert ei.value.hint  # every error carries a fix


def test_unknown_task_message_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'classify'.*\[tasks.classify\].*patterns"):
        load_text(tmp_path, '[[routes]]\ntopic = "a"\ntasks = ["classify"]\n')


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "EDGE_AGENT__SINK__PORT": "1884",
        "EDGE_AGENT__SINK__HOST": "uplink.local",
        "EDGE_AGENT__GATEWAY_ID": "gw-7",
        "EDGE_AGENT__SINK__TLS__CA_FILE": "/etc/ca.pem",
        "OTHER": "x",
    }
    cfg = load_text(tmp_path, ROUTE, env)
    assert (cfg.sink.port, cfg.sink.host, cfg.gateway_id) == (1884, "uplink.local", "gw-7")
    assert str(cfg.sink.tls.ca_file) == "/etc/ca.pem"
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, ROUTE, {"EDGE_AGENT__SINK__PORT": "0"})
    assert ei.value.field == "sink.port"
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, ROUTE, {"EDGE_AGENT__ROUTES": "[]"})
    assert ei.value.field == "EDGE_AGENT__ROUTES"


def test_password_read_from_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = load_text(tmp_path, f'[sink]\nusername = "u"\npassword_file = "{pw}"\n' + ROUTE)
    assert credentials.password(cfg.sink, "sink") == "s3cret"
    assert "s3cret" not in repr(cfg)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_cli_exit_2_names_field(tmp_path: Path, cmd: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[source]\nkeepalive = 1\n" + ROUTE)
    r = run_cli(cmd, "--config", str(p))
    assert r.returncode == 2
    assert "source.keepalive" in r.stderr and "fix:" in r.stderr


def test_cli_missing_file_and_bad_toml(tmp_path: Path) -> None:
    r = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    p = tmp_path / "broken.toml"
    p.write_text("[source\n")
    r = run_cli("check-config", "--config", str(p))
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_cli_check_config_ok_and_version() -> None:
    r = run_cli("check-config", "--config", str(REPO / "configs/local.toml"))
    assert r.returncode == 0 and "ok" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edge-agent ")


def test_cli_run_exit_2_when_a_model_is_missing(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"""
[source]
port = 1
[sink]
port = 1
[outbox]
path = "{tmp_path / "o.db"}"
[tasks.category]
kind = "classifier"
model = "{tmp_path / "no-such-model"}"
labels = {{ a = "x", b = "y" }}
{ROUTE}tasks = ["category"]
""")
    r = run_cli("run", "--config", str(p))
    assert r.returncode == 2, r.stderr
    assert "tasks.category" in r.stderr and "models build" in r.stderr


# -- every field, an invalid value: the error names its path and says how to fix it ---------------------
MODEL_TASKS = {
    "classifier": {"model": "/m", "labels": {"a": "x", "b": "y"}},
    "tagger": {"model": "/m", "head": "/h"},
    "generator": {"model": "/m"},
    "log_template": {},
    "patterns": {},
}


def _base() -> dict:
    tasks = {kind: {"kind": kind, **extra} for kind, extra in MODEL_TASKS.items()}
    return {"routes": [{"topic": "a/+/b"}], "tasks": tasks, "source": {"tls": {}}, "sink": {"tls": {}}}


def _model_of(annotation: object) -> type[BaseModel] | None:
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _leaves(model: type[BaseModel], path: tuple) -> Iterator[tuple[tuple, FieldInfo]]:
    """Every field reachable from `model`: sections recursed into, plus the sections themselves."""
    for name, f in model.model_fields.items():
        if name == "kind":
            continue  # the discriminator: covered by the union_tag_invalid case in test_invalid_field_named_with_fix
        if name == "tasks" and model is config.Config:
            for kind in MODEL_TASKS:
                task_model = next(
                    m for m in get_args(get_args(config.TaskConfig)[0]) if kind in repr(m.model_fields["kind"])
                )
                yield from _leaves(task_model, (*path, "tasks", kind))
            continue
        if name == "routes":
            yield (*path, name), f
            yield from _leaves(config.RouteConfig, (*path, name, 0))
            continue
        sub = _model_of(f.annotation)
        yield (*path, name), f
        if sub is not None:
            yield from _leaves(sub, (*path, name))


def _invalid_values(f: FieldInfo) -> list[object]:
    """A wrong type for the field, plus one value past each of its limits."""
    ann = f.annotation
    args = [a for a in (ann, *get_args(ann)) if a is not type(None)]
    wrong: object
    if _model_of(ann) is not None:
        wrong = 5
    elif bool in args:
        wrong = "maybe"
    elif int in args or float in args:
        wrong = "many"
    elif any(get_origin(a) is Literal for a in args):
        wrong = "bogus"
    elif any(get_origin(a) in (tuple, dict) for a in args):
        wrong = 5
    else:  # str, Path
        wrong = [1]
    values = [wrong]
    for m in f.metadata:
        for attr, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            if (bound := getattr(m, attr, None)) is not None:
                values.append(bound + delta)
        if getattr(m, "min_length", None):
            values.append("" if str in args else [])
        if (n := getattr(m, "max_length", None)) is not None:
            values.append("x" * (n + 1))
        if getattr(m, "pattern", None):
            values.append("no spaces/or slashes allowed!")
    return values


def _set(data: dict, path: tuple, value: object) -> dict:
    node = data
    for part in path[:-1]:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node[path[-1]] = value
    return data


FIELD_CASES = [
    (".".join(map(str, path)), path, v) for path, f in _leaves(config.Config, ()) for v in _invalid_values(f)
]


def test_the_walk_covers_the_model() -> None:
    paths = {p for p, _path, _v in FIELD_CASES}
    assert {"source.port", "sink.tls.ca_file", "routes.0.rate_limit", "tasks.classifier.threshold",
            "tasks.generator.fields", "pipeline.max_json_depth", "log.level", "gateway_id"} <= paths  # fmt: skip
    assert len(FIELD_CASES) > 150


@pytest.mark.parametrize(("field", "path", "value"), FIELD_CASES, ids=[f"{p}={v!r}"[:60] for p, _, v in FIELD_CASES])
def test_every_field_invalid_names_its_path_and_a_fix(field: str, path: tuple, value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(_set(_base(), path, value), environ={})
    assert ei.value.field == field, str(ei.value)
    assert ei.value.hint and ei.value.hint != config.GENERIC_HINT, str(ei.value)


# -- what would fail only at run time fails at load (issue 10, item 12) ------------------------------------
RUNTIME_TRAPS = [
    ("[source]\nsession_expiry = 4294967296\n" + ROUTE, "source.session_expiry"),  # CONNECT holds 4 bytes
    ("[pipeline]\ndrain_timeout_s = inf\n" + ROUTE, "pipeline.drain_timeout_s"),
    ("[pipeline]\ndrain_timeout_s = nan\n" + ROUTE, "pipeline.drain_timeout_s"),
    ("[[routes]]\ntopic = \"a\"\nrate_limit = inf\n", "routes.0.rate_limit"),
    (f'dead_letter_topic = "{"x" * 70_000}"\n' + ROUTE, "dead_letter_topic"),
    ('dead_letter_topic = "edge/dead\\u0000letter"\n' + ROUTE, "dead_letter_topic"),
    ('[sink]\nstatus_topic = "edge/\\u0000/{gateway}"\n' + ROUTE, "sink.status_topic"),
    (f'gateway_id = "{"g" * 64}"\n[sink]\nstatus_topic = "{"s" * 65_500}/{{gateway}}"\n' + ROUTE, "sink.status_topic"),
    ('[[routes]]\ntopic = "plant/\\u0000/notes"\n', "routes.0.topic"),
    ('[[routes]]\ntopic = "plant/\\u0007/notes"\n', "routes.0.topic"),
    (f'[[routes]]\ntopic = "{"é" * 40_000}"\n', "routes.0.topic"),  # 80,000 bytes of UTF-8
    ('[[routes]]\ntopic = "a"\noutput_topic = "out/\\u0000/{topic}"\n', "routes.0.output_topic"),
    ('[[routes]]\ntopic = "a"\nreview_topic = "rev/\\u009f/{topic}"\n', "routes.0.review_topic"),
    ('[tasks.p]\nkind = "patterns"\nasset_patterns = [\'(\\w+\\s?)+$\']\n' + ROUTE, "tasks.p.asset_patterns"),
    ('[tasks.p]\nkind = "patterns"\ncode_patterns = [\'(a|aa)+$\']\n' + ROUTE, "tasks.p.code_patterns"),
    ('[tasks.p]\nkind = "patterns"\nasset_patterns = [\'(?:[A-Z]+-)*\\d+\']\n' + ROUTE, "tasks.p.asset_patterns"),
]


@pytest.mark.parametrize(("text", "field"), RUNTIME_TRAPS, ids=[f for _, f in RUNTIME_TRAPS])
def test_runtime_traps_rejected_at_load(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, text)
    assert ei.value.field == field, str(ei.value)
    assert ei.value.hint and ei.value.hint != config.GENERIC_HINT, str(ei.value)


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_cli_exit_2_on_runtime_traps(tmp_path: Path, cmd: str) -> None:
    """The CLI path, start included: exit 2 naming the field, never a traceback and never a daemon that starts."""
    for i, (text, field) in enumerate(RUNTIME_TRAPS[:1] + RUNTIME_TRAPS[1:][::5]):
        p = tmp_path / f"{i}.toml"
        p.write_text(text)
        r = run_cli(cmd, "--config", str(p))
        assert r.returncode == 2, (field, r.stderr[-2000:])
        assert field in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("x = " + "[" * 5000 + "]" * 5000 + "\n" + ROUTE, "line 1"),
        (ROUTE + "\n# [[[ in a comment\ns = '[[[['\nx = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n", "line 6"),
        (ROUTE + "\n\nx = " + "1" * 5000 + "\n", "line 5"),
        ("[source]\nport = " + "9" * 5000 + "\n" + ROUTE, "line 2"),
        ("a" + ".a" * 5000 + " = 1\n" + ROUTE, "a.a.a"),
    ],
    ids=["array-5000-deep", "table-5000-deep", "int-5000-digits", "port-5000-digits", "dotted-key-5000-deep"],
)
def test_cli_exit_2_on_toml_bombs(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "bomb.toml"
    p.write_text(text)
    for cmd in ("check-config", "run"):
        r = run_cli(cmd, "--config", str(p))
        assert r.returncode == 2, r.stderr[-2000:]
        assert where in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_env_override_too_long_to_parse_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, ROUTE, {"EDGE_AGENT__SOURCE__PORT": "9" * 5000})
    assert ei.value.field == "source.port"


@pytest.mark.parametrize(
    "pattern",
    [r"(a+)+$", r"(\w+\s?)*$", r"(a|aa)+$", r"(a.|.a)+$", r"(?:a+){3}x", r"(?:(a+)+b)++", r"(?>(a*)*b)",
     r"((?:a|b)+c?)+$", r"(?=(a+)+$)"],
)
def test_backtracking_patterns_refused(pattern: str) -> None:
    assert config._backtracking_risk(pattern)


@pytest.mark.parametrize(
    "pattern",
    [config.PatternsTaskConfig().asset_patterns[0], config.PatternsTaskConfig().code_patterns[0],
     r"\b(?:P|M|HX|V|C)-?\d{2,4}[A-Z]?\b", r"(a|a)+", r"(?:\w++\s?+)+$", r"(?>\w+\s?)+$", r"(?:ab){2,5}",
     r"[A-Z]+-\d+", r"(?:[A-Z]++-)*+\d+"],
)
def test_safe_patterns_accepted(pattern: str) -> None:
    assert config._backtracking_risk(pattern) is None

