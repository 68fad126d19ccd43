"""TLS and mutual TLS against a real Mosquitto, with a PKI made here by `openssl`.

One broker, several listeners: plain (for the test's own clients), TLS, mutual TLS, and listeners with a
certificate from an untrusted CA, for the wrong host name, and expired. Notes must flow over TLS on both
connections; each failure must be logged naming the connection, host:port and the likely fix; a bad file
must fail at start naming its key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.errors import ConfigError
from edge_agent.mqtt.client import preflight

from .kit import REPO, wait_for
from .kit.broker import Broker, accepting, free_port
from .kit.config import write_config, write_toml

CA_CNF = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = p
copy_extensions = copy
unique_subject = no
[p]
commonName = supplied
"""
LOCAL_SAN = "IP:127.0.0.1,DNS:localhost"


class PKI:
    """CAs and certificates made with the openssl command line, as an operator would."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _run(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(["openssl", *args], cwd=cwd or self.root, check=True, capture_output=True, timeout=60)

    def ca(self, name: str) -> Path:
        d = self.root / name
        d.mkdir()
        (d / "ca.cnf").write_text(CA_CNF)
        (d / "index.txt").write_text("")
        (d / "serial").write_text("01\n")
        self._run(*_NEW_KEY, "-x509", "-subj", f"/CN={name}", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
                  cwd=d)  # fmt: skip
        return d / "ca.pem"

    def cert(self, ca: Path, name: str, san: str, dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
        d = ca.parent
        ext = ["-addext", f"subjectAltName={san}"] if san else []
        self._run(*_NEW_KEY, "-subj", f"/CN={name}", *ext, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        start, end = dates or ("20200101000000Z", "21000101000000Z")
        self._run("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-notext",
                  "-in", f"{name}.csr", "-out", f"{name}.pem", "-startdate", start, "-enddate", end, cwd=d)  # fmt: skip
        return d / f"{name}.pem", d / f"{name}.key"


_NEW_KEY = ("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


class TLSBroker:
    """Mosquitto with a plain listener and one TLS listener per case."""

    LISTENERS = ("tls", "mtls", "rogue", "wronghost", "expired")

    def __init__(self, root: Path) -> None:
        pki = PKI(root)
        self.ca, rogue_ca = pki.ca("ca"), pki.ca("rogue")
        self.server = pki.cert(self.ca, "server", LOCAL_SAN)
        self.client = pki.cert(self.ca, "client", "")
        self.rogue_client = pki.cert(rogue_ca, "rogue-client", "")
        certs = {
            "tls": self.server,
            "mtls": self.server,
            "rogue": pki.cert(rogue_ca, "rogue-server", LOCAL_SAN),
            "wronghost": pki.cert(self.ca, "wronghost", "DNS:other.example"),
            "expired": pki.cert(self.ca, "expired", LOCAL_SAN, ("20200101000000Z", "20200102000000Z")),
        }
        self.broker = Broker(root / "broker")
        self.port = {name: free_port() for name in self.LISTENERS}
        lines = [self.broker.conf.read_text()]
        for name, (cert, key) in certs.items():
            lines += [f"listener {self.port[name]} 127.0.0.1", f"cafile {self.ca}"]
            lines += [f"certfile {cert}", f"keyfile {key}"]
            if name == "mtls":
                lines.append("require_certificate true")
        self.broker.conf.write_text("\n".join(lines) + "\n")
        self.broker.start()
        assert wait_for(lambda: all(accepting(p) for p in self.port.values()), 10), self.broker.log()[-2000:]



@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory):
    b = TLSBroker(tmp_path_factory.mktemp("tls"))
    yield b
    b.broker.stop()


def tls_table(section: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> dict:
    """The `[<section>.tls]` table, as {section: {"tls": ...}}."""
    tls: dict[str, Path] = {}
    if ca:
        tls["ca_file"] = ca
    if cert:
        tls["cert_file"], tls["key_file"] = cert
    return {section: {"tls": tls}}


@pytest.mark.parametrize("mutual", ["sink", "source"])
def test_notes_flow_over_tls_and_mutual_tls(tmp_path, tb, collect, publisher, run_agent, mutual):
    """One connection over TLS (server verified), the other over mutual TLS with a client certificate."""
    other = "source" if mutual == "sink" else "sink"
    extra = {**tls_table(mutual, tb.ca, tb.client), **tls_table(other, tb.ca)}
    cfg = write_config(
        tmp_path / "c.toml",
        source_port=tb.port["mtls" if mutual == "source" else "tls"],
        sink_port=tb.port["mtls" if mutual == "sink" else "tls"],
        outbox=tmp_path / "o.db",
        **extra,
    )
    plain = tb.broker.port
    out = collect(plain, f"edge/results/plant/{mutual}/#")
    run_agent(cfg)
    pub = publisher(plain)
    for i in range(20):
        pub.note(f"plant/{mutual}/notes", i)
    assert wait_for(lambda: len(out.json()) >= 20, 30), len(out.json())
    assert sorted(r["input_id"] for r in out.json()) == sorted(f"n{i}" for i in range(20))


CASES = {
    # id: (source listener, source tls, sink listener, sink tls, source expects, sink expects)
    "untrusted-ca+wrong-host": (
        "rogue", "ca", "wronghost", "ca",
        ("not trusted", "source.tls.ca_file"), ("not valid for 127.0.0.1", "subjectAltName"),
    ),
    "no-client-cert+expired": (
        "mtls", "ca", "expired", "ca",
        ("", "requires a client certificate? set source.tls.cert_file/key_file"), ("out of date", "renew"),
    ),
    "rogue-client-cert+not-tls": (
        "mtls", "rogue-client", "plain", "ca",
        ("rejected our client certificate", "source.tls.cert_file"), ("dropped the TLS handshake", "a TLS listener?"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_tls_failures_are_logged_with_the_fix(tmp_path, tb, spawn_agent, case):
    src_l, src_tls, sink_l, sink_tls, src_expect, sink_expect = CASES[case]

    def table(section: str, what: str) -> dict:
        return tls_table(section, tb.ca, tb.rogue_client if what == "rogue-client" else None)

    ports = {**tb.port, "plain": tb.broker.port}
    cfg = write_config(
        tmp_path / "c.toml",
        source_port=ports[src_l],
        sink_port=ports[sink_l],
        outbox=tmp_path / "o.db",
        **table("source", src_tls),
        **table("sink", sink_tls),
    )
    logpath = tmp_path / "agent.log"
    agent = spawn_agent(cfg, logpath)

    def events() -> dict[str, dict]:
        found = {}
        for line in logpath.read_text(errors="replace").splitlines():
            if line.startswith("{") and (e := json.loads(line))["event"].endswith(".tls_failed"):
                found.setdefault(e["event"], e)
        return found

    assert wait_for(lambda: len(events()) == 2, 60), logpath.read_text()[-3000:]
    assert agent.alive()  # a broker we cannot reach yet is no reason to exit
    agent.kill()
    for name, port, (err, hint) in (("source", ports[src_l], src_expect), ("sink", ports[sink_l], sink_expect)):
        e = events()[f"{name}.tls_failed"]
        assert (e["host"], e["port"], e["level"]) == ("127.0.0.1", port, "error")
        assert err in e["error"] and hint in e["hint"], e


def _cfg(tmp_path: Path, extra: dict) -> config.Config:
    return config.load(write_toml(tmp_path / "c.toml", {**extra, "routes": [{"topic": "a"}]}), environ={})


def test_bad_tls_files_fail_at_start_naming_the_key(tmp_path, tb) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        "source.tls.ca_file": tls_table("source", tmp_path / "missing.pem"),
        "sink.tls.cert_file": tls_table("sink", tb.ca, (tmp_path / "nope.pem", tb.client[1])),
        "sink.tls.key_file": tls_table("sink", tb.ca, (tb.client[0], tmp_path)),  # a directory
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError) as ei:
            preflight(_cfg(tmp_path, extra))
        assert ei.value.field == key and "cannot read" in ei.value.message and ei.value.hint, ei.value
    with pytest.raises(ConfigError, match="no usable CA certificate") as ei:
        preflight(_cfg(tmp_path, tls_table("sink", garbage)))
    assert ei.value.field == "sink.tls.ca_file"
    with pytest.raises(ConfigError, match="KEY_VALUES_MISMATCH") as ei:  # someone else's key
        preflight(_cfg(tmp_path, tls_table("source", tb.ca, (tb.client[0], tb.server[1]))))
    assert ei.value.field == "source.tls.key_file"
    preflight(_cfg(tmp_path, tls_table("source", tb.ca, tb.client)))  # and the good one loads


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_cli_exit_2_on_a_missing_cert(tmp_path, tb, cmd) -> None:
    p = write_toml(tmp_path / "c.toml", {
        "outbox": {"path": tmp_path / "o.db"},
        **tls_table("sink", tb.ca, (tmp_path / "gone.pem", tb.client[1])),
        "routes": [{"topic": "a"}],
    })
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", cmd, "--config", str(p)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "sink.tls.cert_file" in r.stderr and "gone.pem" in r.stderr and "fix:" in r.stderr
