"""Passwords come from a file or a systemd credential, and never show up anywhere else.

The daemon runs at log level debug against a Mosquitto that requires a password (mosquitto_passwd), with
the right password and then a wrong one, handling good and bad input; the secret must appear in no log
line, no published result, dead letter or status message, no error, no outbox byte, and not in the
config's repr or dump (only the path or credential name is kept).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.errors import ConfigError
from edge_agent.mqtt.client import preflight
from edge_agent.mqtt.credentials import password

from .kit import REPO, wait_for
from .kit.broker import Broker, free_port
from .kit.config import write_config

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
ROUTE = '[[routes]]\ntopic = "plant/+/notes"\n'


@pytest.fixture
def auth_broker(tmp_path: Path):
    """A plain anonymous listener for the test's clients, and one that requires user `edge` + password."""
    password = "S3cret-" + secrets.token_hex(8)
    pwfile = tmp_path / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(pwfile), "edge", password], check=True, timeout=30)
    b = Broker(tmp_path / "broker")
    b.auth_port = free_port()
    b.conf.write_text(
        "per_listener_settings true\n"
        + b.conf.read_text()
        + f"listener {b.auth_port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n"
    )
    b.start()
    b.password = password
    yield b
    b.stop()


def _daemon_config(tmp_path, broker, monkeypatch, source_pw: str, sink_pw: str, tag: str) -> Path:
    """Config at log level debug: source password from a file, sink from a systemd credential."""
    creds = tmp_path / f"creds-{tag}"
    creds.mkdir()
    (creds / "uplink-password").write_text(sink_pw + "\n")
    (tmp_path / f"source-{tag}.pw").write_text(source_pw + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = write_config(
        tmp_path / f"{tag}.toml",
        source_port=broker.auth_port,
        sink_port=broker.auth_port,
        outbox=tmp_path / f"{tag}.db",
        routes=[{"topic": "plant/+/notes", "id_field": "id", "tasks": ["patterns"]}],
        log={"level": "debug"},
        source={"username": "edge", "password_file": tmp_path / f"source-{tag}.pw"},
        sink={"username": "edge", "password_credential": "uplink-password"},
    )
    return cfg


def test_secret_never_leaks_at_debug_level(tmp_path, auth_broker, spawn_agent, collect, publisher, monkeypatch):
    secret = auth_broker.password
    wrong = "Wr0ng-" + secrets.token_hex(8)
    everything = collect(auth_broker.port, "#")
    # 1. The right password: notes flow, bad input is dead-lettered.
    cfg = _daemon_config(tmp_path, auth_broker, monkeypatch, secret, secret, "ok")
    log_ok = tmp_path / "ok.log"
    agent = spawn_agent(cfg, log_ok)
    pub = publisher(auth_broker.port)
    assert wait_for(lambda: any(t.startswith("edge/status/") for t, _p, _r in everything.messages), 30)
    assert wait_for(lambda: "source.connected" in log_ok.read_text(), 30), log_ok.read_text()[-2000:]
    for i in range(5):
        pub.note("plant/a/notes", i)
    pub.publish("plant/a/notes", b"\xff\xfe not utf-8")
    pub.publish("plant/a/notes", '{"text": 1}')
    assert wait_for(lambda: len(everything.json("edge/results/")) >= 5 and len(everything.json("edge/deadletter")) >= 2)
    assert agent.kill(15) == 0
    # 2. A wrong password on both connections: refused, explained, and still not echoed.
    cfg = _daemon_config(tmp_path, auth_broker, monkeypatch, wrong, wrong, "bad")
    log_bad = tmp_path / "bad.log"
    agent = spawn_agent(cfg, log_bad)
    refused = ("source.connect_refused", "sink.connect_refused")
    assert wait_for(lambda: all(e in log_bad.read_text() for e in refused), 30), log_bad.read_text()[-2000:]
    assert agent.kill(15) == 0
    events = [json.loads(line) for line in log_bad.read_text().splitlines() if line.startswith("{")]
    hint = next(e for e in events if e["event"] == "sink.connect_refused")["hint"]
    assert "sink.username" in hint and "password_credential" in hint

    logs = log_ok.read_bytes() + log_bad.read_bytes()
    assert b'"level": "debug"' in logs  # debug really was on
    published = b"".join(p for _t, p, _r in everything.messages)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("*.db*"))
    for s in (secret, wrong):
        for where, data in (("logs", logs), ("published", published), ("outbox", stored)):
            assert s.encode() not in data, where


def test_config_keeps_only_where_the_secret_is(tmp_path, monkeypatch) -> None:
    secret = "S3cret-" + secrets.token_hex(8)
    (tmp_path / "pw").write_text(secret + "\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "uplink").write_text(secret)
    p = tmp_path / "c.toml"
    p.write_text(
        f'[source]\nusername = "u"\npassword_file = "{tmp_path / "pw"}"\n'
        '[sink]\nusername = "u"\npassword_credential = "uplink"\n' + ROUTE
    )
    cfg = config.load(p, environ={})
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    assert password(cfg.source, "source") == secret and password(cfg.sink, "sink", env) == secret
    for shown in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.model_dump())):
        assert secret not in shown
    assert "uplink" in cfg.model_dump_json()  # the credential's name is what is kept

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as ei:
        preflight(cfg)
    assert ei.value.field == "sink.password_credential" and "LoadCredential=uplink:" in ei.value.hint
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # set, but no such credential in it
    with pytest.raises(ConfigError) as ei:
        preflight(cfg)
    assert ei.value.field == "sink.password_credential" and "cannot read" in ei.value.message
    assert secret not in str(ei.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[sink]\nusername = "u"\npassword_file = "/a"\npassword_credential = "b"\n', "not both"),
        ('[sink]\npassword_credential = "b"\n', "username"),
        ('[sink]\nusername = "u"\npassword_credential = "../etc/shadow"\n', "pattern"),
    ],
)
def test_password_source_rules(tmp_path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text + ROUTE)
    with pytest.raises(ConfigError) as ei:
        config.load(p, environ={})
    assert ei.value.field.startswith("sink") and message in str(ei.value) and ei.value.hint


def test_check_config_reads_password_files(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f'[source]\nusername = "u"\npassword_file = "{tmp_path / "missing"}"\n' + ROUTE)
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", "--config", str(p)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "source.password_file" in r.stderr and "cannot read" in r.stderr, r.stderr


def test_check_config_outside_the_service_notes_unchecked_credentials(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[sink]\nusername = "u"\npassword_credential = "uplink"\n' + ROUTE)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", "--config", str(p)],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 0 and "password_credential not checked" in r.stdout, r.stderr
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)  # inside the service: checked, and missing
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", "--config", str(p)],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "sink.password_credential" in r.stderr and "cannot read" in r.stderr, r.stderr
